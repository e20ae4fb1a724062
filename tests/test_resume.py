"""Exact resume: a real subprocess is killed mid-run (SIGKILL) or stopped (SIGTERM), resumed, and every later
logged loss must equal the uninterrupted run's bit for bit."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

CHILD = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    import numpy as np, torch
    torch.set_num_threads(1)
    from chatforge.config import ModelConfig, TrainConfig
    from chatforge.data.loader import TokenLoader, iter_eval_batches
    from chatforge.model import GPT
    from chatforge.train import train

    out, resume, stall_at, stall_s = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), float(sys.argv[4])
    data = np.frombuffer(Path(os.__file__).read_bytes(), dtype=np.uint8).astype(np.uint16)
    tr, va = data[:40000], data[40000:44000]

    class SlowLoader(TokenLoader):
        """Stalls at one batch so the parent can interrupt the run at a known point."""
        calls = 0
        def next_batch(self):
            SlowLoader.calls += 1
            if SlowLoader.calls == stall_at:
                print("STALL", flush=True)
                for _ in range(int(stall_s * 20)):
                    time.sleep(0.05)
            return super().next_batch()

    torch.manual_seed(123)  # a resumed run's init is overwritten by the checkpoint anyway
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, seq_len=32, vocab_size=256, dropout=0.1))
    cfg = TrainConfig(steps=24, batch_size=4, lr=3e-3, warmup_steps=3, eval_every=6, ckpt_every=8, log_every=1,
                      seed=5)
    res = train(model, cfg, SlowLoader([tr], 4, 32, seed=9), out, resume=resume,
                val_batches=lambda: iter_eval_batches([va], 8, 32, max_batches=2), meta={"stage": "pretrain"})
    print("RESULT", res["step"], res["interrupted"], flush=True)
''')


def run_child(script: Path, out: Path, resume=False, stall_at=0, stall_s=0.0, signal_at=0) -> subprocess.Popen:
    import os
    env = {**os.environ, "CHATFORGE_SIGNAL_AT_STEP": str(signal_at)}  # train() sends itself SIGTERM then
    return subprocess.Popen([sys.executable, str(script), str(out), "1" if resume else "0", str(stall_at),
                             str(stall_s)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def train_losses(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def wait_for_checkpoint(out: Path, step: int, proc: subprocess.Popen, timeout=60.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if json.loads((out / "ckpt" / "latest.json").read_text())["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError("checkpoint never appeared")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    script = d / "child.py"
    script.write_text(CHILD)
    ref = d / "reference"
    p = run_child(script, ref)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    losses = train_losses(ref)
    assert sorted(losses) == list(range(1, 25))
    return script, losses, d


def test_sigkill_mid_run_then_resume_is_bit_identical(setup):
    script, ref, d = setup
    out = d / "killed"
    p = run_child(script, out, stall_at=12, stall_s=60)  # checkpoint at step 8, then stalls in step 12
    wait_for_checkpoint(out, 8, p)
    for line in p.stdout:  # wait until it is stuck inside step 12, well past its checkpoint
        if line.startswith("STALL"):
            break
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL
    before = train_losses(out)
    assert max(before) == 11  # the run really got past its checkpoint before dying
    with open(out / "metrics.jsonl", "a") as f:  # and a line torn mid-write (power loss, full disk)
        f.write('{"step": 12, "kind": "tra')
    r = run_child(script, out, resume=True)
    log = r.communicate(timeout=120)[0]
    assert r.returncode == 0 and "RESULT 24 False" in log, log
    after = train_losses(out)
    assert sorted(after) == list(range(1, 25))  # no duplicates from the killed run
    assert all(after[s] == ref[s] for s in range(9, 25)), [(s, after[s], ref[s]) for s in range(9, 25)]


def test_sigterm_saves_then_resume_is_bit_identical(setup):
    script, ref, d = setup
    out = d / "terminated"
    p = run_child(script, out, signal_at=11)  # SIGTERM during step 11: deterministic, no timing window
    log = p.communicate(timeout=60)[0]
    assert p.returncode == 0 and "interrupted" in log and "RESULT 11 True" in log, log
    stopped_at = json.loads((out / "ckpt" / "latest.json").read_text())["step"]
    assert stopped_at == 11  # saved a new checkpoint on the signal, not only the periodic one (step 8)
    r = run_child(script, out, resume=True)
    log = r.communicate(timeout=120)[0]
    assert r.returncode == 0 and "RESULT 24 False" in log, log
    after = train_losses(out)
    assert all(after[s] == ref[s] for s in range(1, 25)), [(s, after[s], ref[s]) for s in range(1, 25)]


def test_an_interrupted_stage_exits_143_and_says_how_to_resume(tiny_run, tmp_path):
    """SIGTERM (sent by the run itself at step 5, so no timing is involved): checkpoint saved, exit 128 + 15,
    the resume command printed; then --resume finishes with 0."""
    import os
    import shutil
    run = tmp_path / "run"
    for part in ("data", "tokenizer", "tokens", "config.yaml"):
        src = tiny_run / part
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, run / part)
    env = {**os.environ, "CHATFORGE_SIGNAL_AT_STEP": "5"}
    cmd = [sys.executable, "-m", "chatforge", "pretrain", str(run), "train.steps=12", "train.eval_every=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 143, r.stderr
    assert f"chatforge pretrain {run} --resume" in r.stderr
    assert json.loads((run / "pretrain" / "ckpt" / "latest.json").read_text())["step"] == 5
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "pretrain" / "ckpt" / "latest.json").read_text())["step"] == 12
