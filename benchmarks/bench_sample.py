"""Sampling one token from logits: chatforge sample_next vs transformers' logits warpers, same settings.

Temperature, top-k and top-p filtering, then a multinomial draw, as each library's generate does it per step.
    python benchmarks/bench_sample.py [--vocab 2048 32000 --batch 1 8 --top-k 50 --top-p 0.95 --threads 1]
Both are timed in the same run, alternating; it also checks both keep the same candidate set.
"""
from __future__ import annotations

import argparse
import statistics
import timeit

import torch

from chatforge.engine import sample_next


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[2048, 32000])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    torch.set_num_threads(args.threads)
    # HF's order in generate(): temperature, top-k, top-p (each filters with -inf), then softmax + multinomial.
    warpers = LogitsProcessorList([TemperatureLogitsWarper(args.temperature), TopKLogitsWarper(args.top_k),
                                   TopPLogitsWarper(args.top_p)])
    print(f"temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}, {args.threads} thread(s); "
          f"median of {args.rounds} rounds")
    print(f"{'vocab':>6} {'batch':>5} {'chatforge us':>13} {'transformers us':>16} {'ratio':>6}")
    g = torch.Generator().manual_seed(0)
    for V in args.vocab:
        for B in args.batch:
            logits = torch.randn(B, V, generator=g) * 3
            ids = torch.zeros(B, 1, dtype=torch.long)

            def ours():
                return sample_next(logits, None, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   repetition_penalty=1.0, generator=g)

            def theirs():
                scores = warpers(ids, logits.clone())
                return torch.multinomial(scores.softmax(-1), 1, generator=g).squeeze(1)

            # Same candidates: what HF leaves finite is what ours can draw (checked with many draws of row 0).
            kept = torch.isfinite(warpers(ids, logits.clone())[0]).nonzero().flatten().tolist()
            draws = sample_next(logits[:1].expand(4000, -1), None, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, repetition_penalty=1.0, generator=g)
            assert set(draws.tolist()) <= set(kept), "chatforge drew a token transformers filters out"
            n = max(1, int(2000 * 2048 / V))
            t_ours, t_theirs = [], []
            for _ in range(args.rounds):
                t_ours.append(timeit.timeit(ours, number=n) / n)
                t_theirs.append(timeit.timeit(theirs, number=n) / n)
            a, b = statistics.median(t_ours) * 1e6, statistics.median(t_theirs) * 1e6
            print(f"{V:>6} {B:>5} {a:>13.1f} {b:>16.1f} {b / a:>5.2f}x")


if __name__ == "__main__":
    from chatforge.machine import describe
    print(describe(), flush=True)
    main()
