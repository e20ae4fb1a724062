"""Training memory does not grow with the corpus: peak RSS of the same run on 1 GB vs 10 MB of token shards.

Random uint16 token shards in the real shard format (chatforge.data.shards.pack_header) are written under
/tmp, then each size trains the same small model for a few hundred steps in its own subprocess (the real
TokenLoader.from_dir memory-map path and the real train()), and the peak resident set sizes are compared.
Goal: the 1 GB run uses at most 100 MB more than the 10 MB run.

    .venv/bin/python benchmarks/bench_memory.py [--big-mb 1024] [--small-mb 10] [--steps 300] [--keep]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

CHILD = textwrap.dedent('''
    import json, resource, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from chatforge.config import ModelConfig, TrainConfig
    from chatforge.data.loader import TokenLoader
    from chatforge.model import GPT
    from chatforge.train import train

    shards, out, steps, VOCAB = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_kv_head=4, n_embd=128, seq_len=256, vocab_size=VOCAB))
    loader = TokenLoader.from_dir(shards, 8, 256, seed=0)
    before = rss()
    cfg = TrainConfig(steps=steps, batch_size=8, eval_every=0, log_every=50, warmup_steps=10, device="cpu",
                      compile="off")
    res = train(model, cfg, loader, out, val_batches=None, meta={}, log=lambda m: None)
    print(json.dumps({"peak_rss_mb": rss(), "rss_before_train_mb": before, "steps": res["step"],
                      "tokens_in_corpus": sum(len(a) for a in loader.arrays)}))
''')


# A small vocabulary keeps each step cheap (the output layer dominates a tiny model); ids are still uint16.
VOCAB = 4096


def write_shards(d: Path, megabytes: float, shard_mb: int = 256, seed: int = 0) -> None:
    """Random tokens < VOCAB as uint16 shards of at most shard_mb each, one document per shard."""
    from chatforge.data.shards import pack_header

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    left, i = int(megabytes * 2**20) // 2, 0
    while left > 0:
        n = min(left, shard_mb * 2**20 // 2)
        with open(d / f"shard_{i:05d}.bin", "wb") as f:
            f.write(pack_header(VOCAB, "0123456789abcdef", n, 1))
            for start in range(0, n, 1 << 24):  # 32 MB at a time: the writer's own memory stays small
                f.write(rng.integers(0, VOCAB, min(1 << 24, n - start), dtype=np.uint16).tobytes())
        np.save(d / f"shard_{i:05d}.idx.npy", np.zeros(1, dtype=np.int64))
        left, i = left - n, i + 1


def run(shards: Path, out: Path, steps: int, script: Path) -> dict:
    p = subprocess.run([sys.executable, str(script), str(shards), str(out), str(steps), str(VOCAB)], capture_output=True,
                       text=True, timeout=1800)
    if p.returncode:
        raise SystemExit(p.stdout + p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-mb", type=float, default=1024)
    ap.add_argument("--small-mb", type=float, default=10)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--keep", action="store_true", help="keep the generated shards")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="chatforge-mem-", dir="/tmp"))
    try:
        script = root / "child.py"
        script.write_text(CHILD)
        results = {}
        for name, mb in (("small", a.small_mb), ("big", a.big_mb)):
            write_shards(root / name, mb)
            results[name] = run(root / name, root / f"out-{name}", a.steps, script)
            r = results[name]
            print(f"{mb:8.0f} MB of shards ({r['tokens_in_corpus']:,} tokens): peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(before training {r['rss_before_train_mb']:.0f} MB), {r['steps']} steps")
        diff = results["big"]["peak_rss_mb"] - results["small"]["peak_rss_mb"]
        print(f"difference: {diff:+.0f} MB (goal <= 100 MB) -> {'OK' if diff <= 100 else 'OVER'}")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    from chatforge.machine import describe
    print(describe(), flush=True)
    main()
