"""Char-level tinyshakespeare speed run: how fast does the recipe reach nanoGPT's val loss 1.8857 on this CPU?

Data: /work/shared/data/tinyshakespeare.txt, first 90% train / last 10% val, vocab = sorted chars (65).
Val loss is measured the nanoGPT way during training (mean over random val windows, fixed seed) and over
the full split (every non-overlapping window) at the end.

    .venv/bin/python benchmarks/bench_shakespeare.py                   # the recipe in configs/shakespeare-char.yaml
    .venv/bin/python benchmarks/bench_shakespeare.py train.lr=0.01     # try a change
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from chatforge.config import load_config
from chatforge.data.loader import TokenLoader, iter_eval_batches
from chatforge.model import GPT
from chatforge.train import train, val_loss

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RECIPE = ROOT / "configs" / "shakespeare-char.yaml"
TARGET = 1.8857


def random_val_batches(val: np.ndarray, seq_len: int, batch: int = 32, n: int = 10, seed: int = 0):
    """nanoGPT's estimate: random windows, but the same ones every time so evaluations compare."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(val) - seq_len - 1, size=(n, batch))
    out = []
    for row in starts:
        buf = torch.from_numpy(np.stack([val[s:s + seq_len + 1] for s in row]).astype(np.int64))
        out.append({"x": buf[:, :-1], "y": buf[:, 1:]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="key.sub=value changes to the recipe")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: a temp dir)")
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} not found")
    torch.set_num_threads(args.threads)
    cfg = load_config(str(RECIPE), args.overrides)
    text = DATA.read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    tr, va = ids[:n], ids[n:]
    cfg.model.vocab_size = len(chars)
    T = cfg.model.seq_len
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    print(f"vocab {len(chars)}, train {len(tr):,} / val {len(va):,} chars, model {model.num_params() / 1e6:.2f}M "
          f"params, {cfg.train.steps} steps x {cfg.train.batch_size * cfg.train.grad_accum} x {T} tokens, "
          f"optimizer {cfg.train.optimizer} lr {cfg.train.lr}", flush=True)
    val_set = random_val_batches(va, T, n=cfg.train.eval_batches)
    out = args.out or Path(tempfile.mkdtemp(prefix="shakespeare-"))
    t0 = time.perf_counter()
    print("train start", flush=True)  # bench_nanogpt.py times the process from outside against this line
    res = train(model, cfg.train, TokenLoader([tr], cfg.train.batch_size, T, seed=cfg.train.seed), out,
                val_batches=lambda: val_set, meta={"stage": "pretrain", "bench": "shakespeare-char"},
                log=lambda m: print(f"[{time.perf_counter() - t0:6.1f} s] {m}", flush=True))
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in recs if r["kind"] == "val"]
    times = {r["step"]: r["time"] for r in recs if r["kind"] == "train"}
    print("step   time_s  train   val(random batches)")
    hit = None
    for r in vals:
        t = times.get(r["step"], float("nan"))
        print(f"{r['step']:5d} {t:7.1f}  {r['train_loss'] or float('nan'):.4f}  {r['val_loss']:.4f}")
        if hit is None and r["val_loss"] <= TARGET:
            hit = (r["step"], t)
    full = val_loss(model, iter_eval_batches([va], 64, T), torch.device("cpu"))
    print(f"wall {wall:.1f} s (train() incl. evals and checkpoint), {res['tokens']:,} tokens, "
          f"{res['tokens'] / res['seconds']:,.0f} tok/s")
    print(f"final val loss: {res['final_val_loss']:.4f} (random batches), {full:.4f} (full split)")
    if hit:
        print(f"target {TARGET} first reached at step {hit[0]} after {hit[1]:.1f} s")
    else:
        print(f"target {TARGET} NOT reached")
    print(json.dumps({"wall_s": round(wall, 1), "val_random": res["final_val_loss"], "val_full": full,
                      "reached_at_s": hit[1] if hit else None,
                      "recipe": {"model": dataclasses.asdict(cfg.model), "train": dataclasses.asdict(cfg.train)}}))


if __name__ == "__main__":
    from chatforge.machine import describe
    print(describe(), flush=True)
    main()
