"""Multi-process training on CPU (gloo) launched by the real torchrun: same losses as one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from chatforge.distributed import autocast_ctx, pick_device, setup, wrap_model
from chatforge.errors import UserError

CHILD = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    import numpy as np, torch
    torch.set_num_threads(1)
    from chatforge.config import ModelConfig, TrainConfig
    from chatforge.data.loader import TokenLoader, iter_eval_batches
    from chatforge.distributed import setup, teardown
    from chatforge.model import GPT
    from chatforge.train import train

    out, strategy, global_batch, clip = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    dist = setup("cpu")
    data = np.frombuffer(Path(os.__file__).read_bytes(), dtype=np.uint8).astype(np.uint16)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, seq_len=32, vocab_size=256))
    cfg = TrainConfig(steps=6, batch_size=global_batch // dist.world, lr=3e-3, warmup_steps=2, eval_every=3,
                      ckpt_every=3, log_every=1, seed=1, grad_clip=clip,
                      optimizer="adamw" if clip else "sgd",  # SGD: AdamW would hide a wrong gradient scale
                      precision="fp32")  # the gradient arithmetic is what is compared, to 1e-5
    loader = TokenLoader([data[:30000]], cfg.batch_size, 32, rank=dist.rank, world=dist.world, seed=3)
    # every rank evaluates the same windows; the token-weighted sum across ranks keeps the same mean
    val = lambda: iter_eval_batches([data[30000:34000]], 8, 32, max_batches=4)
    res = train(model, cfg, loader, out, val_batches=val, meta={}, dist=dist, strategy=strategy)
    if dist.is_main:
        print("RESULT", res["step"], flush=True)
    teardown()
''')


def launch(script: Path, out: Path, nproc: int, strategy: str, clip: float = 1.0) -> tuple[int, str]:
    cmd = [sys.executable, str(script), str(out), strategy, "8", str(clip)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    return p.returncode, p.stdout + p.stderr


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    script = d / "child.py"
    script.write_text(CHILD)
    for clip in (1.0, 0.0):
        rc, log = launch(script, d / f"single-{clip}", 1, "none", clip)
        assert rc == 0, log
    return script, d


# Clipping off (and SGD, which unlike AdamW feels the gradient's scale) too: with clipping on, a wrong
# gradient scale across ranks could hide under the clip.
@pytest.mark.parametrize("strategy,clip", [("ddp", 1.0), ("fsdp", 1.0), ("ddp", 0.0), ("fsdp", 0.0)])
def test_two_processes_match_one(single, strategy, clip):
    script, d = single
    out = d / f"{strategy}-{clip}"
    rc, log = launch(script, out, 2, strategy, clip)
    assert rc == 0, log[-4000:]  # an FSDP failure is a failure, whatever the backend says
    a, b = records(d / f"single-{clip}", "train"), records(out, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x, y)
        assert x["tokens"] == y["tokens"]
    va, vb = records(d / f"single-{clip}", "val"), records(out, "val")
    assert len(va) == len(vb) == 2
    for x, y in zip(va, vb):
        assert abs(x["val_loss"] - y["val_loss"]) < 1e-5
    # rank 0 wrote a loadable full checkpoint
    from chatforge.checkpoint import load_model, resolve_checkpoint
    model, meta = load_model(resolve_checkpoint(out / "ckpt", "last"))
    assert meta["step"] == 6


def test_single_process_setup_and_helpers(monkeypatch):
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    info = setup("cpu")
    assert (info.rank, info.world, info.is_main, info.device.type) == (0, 1, True, "cpu")
    m = torch.nn.Linear(2, 2)
    assert wrap_model(m, "ddp") is m  # no process group: nothing to wrap
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(UserError):
        pick_device("tpu")
    with pytest.raises(UserError):
        wrap_model(m, "zero3")
    with autocast_ctx("cpu"):
        assert torch.get_autocast_dtype("cpu") is not None and not torch.is_autocast_enabled("cpu")


def _tiny_gpt(dropout: float = 0.1):
    from chatforge.config import ModelConfig
    from chatforge.model import GPT

    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, seq_len=16, vocab_size=64, dropout=dropout))


def test_parallelize_checkpoints_blocks_with_same_loss_gradients_and_names():
    from chatforge.config import TrainConfig
    from chatforge.distributed import DistInfo, parallelize, unparallelize
    from chatforge.train import loss_sum

    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randint(0, 64, (3, 16), generator=g), "y": torch.randint(0, 64, (3, 16), generator=g)}
    results = []
    for ac in (False, True):
        model = _tiny_gpt()  # dropout on: the recomputed forward must replay the same masks
        keys = list(model.state_dict())
        blocks = list(model.layers)
        calls = []
        for b in blocks:
            b.register_forward_pre_hook(lambda *_: calls.append(1))
        cfg = TrainConfig(activation_checkpointing=ac, compile="off")
        wrapped = parallelize(model, cfg, DistInfo())
        assert wrapped is model  # one process: no DDP wrapper
        assert list(model.state_dict()) == keys  # checkpoints keep their names
        model.load_state_dict(model.state_dict())  # a checkpoint loads back into the wrapped model
        torch.manual_seed(5)
        s, _ = loss_sum(wrapped, batch)
        s.backward()
        assert len(calls) == (4 if ac else 2)  # each block ran again in backward: it was checkpointed
        assert unparallelize(model) is model and list(model.layers) == blocks  # the plain blocks are back
        results.append((s.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    assert loss0 == loss1
    for n in grads0:
        assert torch.allclose(grads0[n], grads1[n], rtol=1e-5, atol=1e-7), n


def test_parallelize_rejects_an_unknown_compile_setting():
    from chatforge.config import TrainConfig
    from chatforge.distributed import DistInfo, parallelize

    with pytest.raises(UserError, match="compile"):
        parallelize(_tiny_gpt(), TrainConfig(compile="sometimes"), DistInfo())


def test_pick_device_takes_a_device_or_a_name():
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    assert pick_device(None).type in ("cuda", "mps", "cpu")
