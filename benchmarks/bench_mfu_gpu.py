"""MFU of a GPT-2-124M-class model at sequence 1024, bf16 autocast, torch.compile, fused AdamW, on one CUDA GPU.

It runs the real chatforge training step (train.loss_sum, the trainer's optimizer and autocast) on random
tokens for a fixed time budget and prints tokens/s and MFU = FLOPs per token x tokens/s / peak bf16 FLOP/s
(the same FLOP count and peak table the trainer's progress bar uses). The goal is >= 50% on an H100.
Whole run, compile included: about 2-4 minutes.

    python benchmarks/bench_mfu_gpu.py [--batch 16] [--seconds 60] [--no-compile]
"""
from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16, help="sequences of 1024 tokens per step")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured time after warm-up")
    ap.add_argument("--warmup", type=int, default=10, help="steps before timing (compile happens here)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--vocab", type=int, default=50304)
    a = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench_mfu_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False here); it measures bf16 "
              "MFU, which has no meaning on a CPU. Use benchmarks/bench_train.py for CPU throughput.",
              file=sys.stderr)
        return 2

    from chatforge.config import TrainConfig, load_config
    from chatforge.distributed import autocast_ctx
    from chatforge.model import GPT
    from chatforge.optim import build_optimizer
    from chatforge.train import loss_sum, peak_flops

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device("cuda")
    cfg = load_config("gpt2-124m")
    cfg.model.vocab_size = a.vocab
    torch.manual_seed(0)
    model = GPT(cfg.model).to(dev)
    opt = build_optimizer(model, TrainConfig(lr=6e-4, weight_decay=0.1))
    fwd = model if a.no_compile else torch.compile(model)
    T = cfg.model.seq_len
    x = torch.randint(0, a.vocab, (a.batch, T + 1), device=dev)
    batch = {"x": x[:, :-1].contiguous(), "y": x[:, 1:].contiguous()}

    def step() -> float:
        with autocast_ctx(dev):
            s, n = loss_sum(fwd, batch)
        (s / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return s

    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        step()
        steps += 1
        if steps % 10 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = steps * a.batch * T / dt
    flops_tok, peak = model.flops_per_token(), peak_flops(dev)
    mfu = flops_tok * tps / peak
    print(f"{torch.cuda.get_device_name(dev)}: GPT-2-124M class ({model.num_params() / 1e6:.1f}M params), batch "
          f"{a.batch}x{T}, bf16 autocast, compile {'off' if a.no_compile else 'on'}")
    print(f"warm-up {warm:.1f}s; {steps} steps in {dt:.1f}s: {tps:,.0f} tokens/s, {flops_tok / 1e9:.3f} GFLOPs/token, "
          f"peak {peak / 1e12:.0f} TFLOP/s -> MFU {mfu:.1%} (goal >= 50% on H100)")
    print(f"peak memory {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    from chatforge.machine import describe
    print(describe(), flush=True)
    sys.exit(main())
