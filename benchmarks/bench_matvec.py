"""Batch-1 projections on CPU: F.linear on (out, in) weights (what transformers runs) vs torch.mm on weights
transposed to (in, out) (what chatforge's decode step runs), per shape, in the same run.

The default shapes are those of benchmarks/bench_generate.py's model (4 layers, width 256, vocabulary 2048)
plus a GPT-2-size head; the last line adds up one token's projections for that model.
    python benchmarks/bench_matvec.py [--threads 1] [--repeat 5]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

# (out, in) of the fused q/k/v, o, fused gate/up, down and vocabulary projections; then a 32k-vocabulary head.
SHAPES = [(768, 256), (256, 256), (1408, 256), (256, 704), (2048, 256)]
LAYERS = 4
EXTRA = [(32000, 768)]


def best_us(fn, n: int, repeat: int) -> float:
    for _ in range(max(n // 10, 10)):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5, help="timed repeats; the fastest counts")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    print(f"{a.threads} thread(s), fp32, batch 1; best of {a.repeat} repeats")
    total = {"linear": 0.0, "mm": 0.0}
    with torch.inference_mode():
        for out_f, in_f in SHAPES + EXTRA:
            x = torch.randn(1, in_f, generator=g)
            w = torch.randn(out_f, in_f, generator=g)
            wt = w.t().contiguous()
            n = max(20, int(2e7 / (out_f * in_f)))
            lin = best_us(lambda: F.linear(x, w), n, a.repeat)
            mm = best_us(lambda: torch.mm(x, wt), n, a.repeat)
            diff = (F.linear(x, w) - torch.mm(x, wt)).abs().max().item()
            print(f"({out_f:>5} x {in_f:>4}): F.linear {lin:8.1f} us   mm on (in, out) {mm:8.1f} us   "
                  f"{lin / mm:.2f}x   max |diff| {diff:.1e}")
            if (out_f, in_f) in SHAPES:
                k = 1 if (out_f, in_f) == SHAPES[-1] else LAYERS
                total["linear"] += k * lin
                total["mm"] += k * mm
    print(f"one token of the {LAYERS}x256 model's projections: F.linear {total['linear']:.0f} us, "
          f"mm on (in, out) {total['mm']:.0f} us ({total['linear'] / total['mm']:.2f}x)")


if __name__ == "__main__":
    from chatforge.machine import describe
    print(describe(), flush=True)
    main()
