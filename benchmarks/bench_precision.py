"""fp32 vs bf16 autocast on this CPU: matmul peaks, training step time of chatforge's GPT and of transformers'
LlamaForCausalLM (same architecture, batch, AdamW), and validation curves of a short run in each precision.

    .venv/bin/python benchmarks/bench_precision.py [--sizes 4x256,8x512] [--rounds 3] [--curve-steps 300] [--png p.png]
Prints the machine (CPU model and flags), the choice precision=auto makes here and why, and per model size
the bf16/fp32 speed-up of both implementations; the curves show whether quality holds at equal steps.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from chatforge import machine
from chatforge.config import ModelConfig, TrainConfig
from chatforge.distributed import autocast_ctx
from chatforge.model import GPT


def step_fn(model, logits_of, x, y, vocab, precision):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with autocast_ctx("cpu", precision):
            logits = logits_of(model, x)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(step, n: int) -> float:
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n


def step_times(n_layer: int, width: int, rounds: int, batch=8, seq=256, vocab=4096) -> dict:
    from bench_train import hf_twin  # same folder
    cfg = ModelConfig(n_layer=n_layer, n_head=width // 64, n_kv_head=width // 64, n_embd=width, seq_len=seq,
                      vocab_size=vocab)
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq))
    y = torch.randint(0, vocab, (batch, seq))
    ours, hf = GPT(cfg), hf_twin(cfg)
    steps = {f"{name} {p}": step_fn(m, f, x, y, vocab, p) for name, m, f in
             (("chatforge", ours, lambda m, x: m(x)), ("transformers", hf, lambda m, x: m(input_ids=x).logits))
             for p in ("fp32", "bf16")}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):  # paired rounds, rotating order: load from other jobs hits every variant alike
        keys = list(steps)
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[k].append(timed(steps[k], 2))
    return {k: statistics.median(v) for k, v in times.items()}


def curves(steps: int, precision: str) -> list[tuple[int, float]]:
    import os
    import tempfile

    import numpy as np

    from chatforge.data.loader import TokenLoader, iter_eval_batches
    from chatforge.train import train

    data = np.frombuffer(Path(os.__file__).read_bytes() * 4, dtype=np.uint8).astype(np.uint16)
    n = int(len(data) * 0.9)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=4, n_head=4, n_kv_head=4, n_embd=128, seq_len=128, vocab_size=256))
    cfg = TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=20, eval_every=max(steps // 10, 1),
                      eval_batches=8, log_every=steps, precision=precision, compile="off")
    with tempfile.TemporaryDirectory() as d:
        train(model, cfg, TokenLoader([data[:n]], 16, 128, seed=0), Path(d), meta={}, log=lambda m: None,
              val_batches=lambda: iter_eval_batches([data[n:]], 16, 128, max_batches=8))
        import json
        recs = [json.loads(l) for l in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in recs if r["kind"] == "val"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4x256,8x512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--curve-steps", type=int, default=300)
    ap.add_argument("--png", default="benchmarks/precision_curves.png")
    a = ap.parse_args()
    print(machine.describe())
    f32, b16 = machine.cpu_peak_flops("float32"), machine.cpu_peak_flops("bfloat16")
    print(f"matmul peak: fp32 {f32 / 1e9:.0f} GFLOP/s, bf16 {b16 / 1e9:.0f} GFLOP/s ({b16 / f32:.2f}x)")
    print(f"precision=auto here: {machine.choose_precision(torch.device('cpu'))[1]}")
    for size in a.sizes.split(","):
        n_layer, width = (int(v) for v in size.split("x"))
        t = step_times(n_layer, width, a.rounds)
        print(f"{size}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in t.items())
              + f"; bf16/fp32 speed-up chatforge {t['chatforge fp32'] / t['chatforge bf16']:.2f}x, transformers "
                f"{t['transformers fp32'] / t['transformers bf16']:.2f}x; chatforge bf16 vs transformers fp32 "
                f"{t['transformers fp32'] / t['chatforge bf16']:.2f}x")
    if a.curve_steps:
        cs = {p: curves(a.curve_steps, p) for p in ("fp32", "bf16")}
        for p, c in cs.items():
            print(f"val loss {p}: " + " ".join(f"{v:.3f}" for _, v in c))
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for p, c in cs.items():
            ax.plot([s for s, _ in c], [v for _, v in c], label=p, marker=".")
        ax.set(xlabel="step", ylabel="val loss", title="4x128 GPT on bytes: fp32 vs bf16 autocast")
        ax.legend()
        fig.savefig(a.png, dpi=100)
        print(f"curves: {a.png}")


if __name__ == "__main__":
    main()
