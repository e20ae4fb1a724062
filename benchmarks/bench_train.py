"""Training steps/s: our GPT vs transformers' LlamaForCausalLM of the same architecture (CPU, fp32).

Every variant gets the same weights, batch, loss and optimizer (AdamW, fused on CPU as chatforge's trainer
uses it); only the model code and whether torch.compile is applied differ. The machine may be shared, so
the variants run paired: each round times a few steps of every variant back to back (rotating the order),
and the reported ratio is the median over rounds of (variant steps/s) / (HF eager steps/s).

    .venv/bin/python benchmarks/bench_train.py [--rounds 7] [--steps 2] [--threads 2] [--no-compile] [--hf-compile]
It also profiles one eager step of each and prints the share of time spent in matrix multiplies and attention
kernels: both models run the same ones, so 1 / (HF's share) bounds what any rewrite of the rest could gain.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from chatforge.config import ModelConfig
from chatforge.model import GPT


def hf_twin(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.hidden(),
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        attn_implementation="sdpa"))
    return hf


def make_step(model, logits_of, x, y, vocab: int):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # fused AdamW runs on CPU since torch 2.4

    def step():
        loss = F.cross_entropy(logits_of(model, x).reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def kernel_share(step) -> float:
    """Fraction of one step's CPU time spent in matmul and attention kernels (self time, torch.profiler)."""
    from torch.profiler import profile

    with profile() as prof:
        step()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    return sum(e.self_cpu_time_total for e in ev if e.key in KERNELS) / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd chatforge variant")
    ap.add_argument("--hf-compile", action="store_true", help="also time torch.compile'd HF (the fair peer)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = ModelConfig(n_layer=a.layers, n_head=a.heads, n_kv_head=a.heads, n_embd=a.embd, seq_len=a.seq,
                      vocab_size=a.vocab)
    torch.manual_seed(0)
    ours = GPT(cfg)
    theirs = hf_twin(cfg)
    missing = theirs.load_state_dict({f"model.{k}" if not k.startswith("lm_head") else k: v
                                      for k, v in ours.state_dict().items()}, strict=False)
    assert not [k for k in missing.missing_keys if "lm_head" not in k], missing
    x = torch.randint(0, a.vocab, (a.batch, a.seq))
    y = torch.randint(0, a.vocab, (a.batch, a.seq))
    with torch.no_grad():  # same weights -> same logits: the comparison is between equal models
        diff = (ours(x) - theirs(input_ids=x).logits).abs().max().item()

    # Each variant trains its own copy of the weights (the optimizer steps must not interfere).
    copy_of = copy.deepcopy

    variants = {"HF eager": make_step(copy_of(theirs), lambda m, x: m(input_ids=x).logits, x, y, a.vocab),
                "chatforge eager": make_step(copy_of(ours), lambda m, x: m(x), x, y, a.vocab)}
    if not a.no_compile:
        m = copy_of(ours)
        cm = torch.compile(m)
        variants["chatforge compiled"] = make_step(m, lambda _, x: cm(x), x, y, a.vocab)
    if a.hf_compile:
        m = copy_of(theirs)
        cm_hf = torch.compile(m)
        variants["HF compiled"] = make_step(m, lambda _, x: cm_hf(input_ids=x).logits, x, y, a.vocab)

    warm = {}
    for name, step in variants.items():  # warm-up; for compiled variants this is the compile time
        t0 = time.perf_counter()
        step()
        step()
        warm[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            for _ in range(a.steps):
                variants[name]()
            times[name].append((time.perf_counter() - t0) / a.steps)

    tok = a.batch * a.seq
    print(f"model {ours.num_params() / 1e6:.2f}M params, batch {a.batch}x{a.seq}, {a.threads} threads, fp32 CPU, "
          f"{a.rounds} rounds x {a.steps} steps, max |logit diff| ours vs HF {diff:.1e}")
    base = times["HF eager"]
    for name in names:
        sps = 1 / statistics.median(times[name])
        ratios = [b / t for b, t in zip(base, times[name])]
        print(f"{name:20s}: {sps:6.3f} steps/s ({sps * tok:8,.0f} tok/s)  vs HF eager: median "
              f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})  "
              f"warm-up {warm[name]:.1f}s")
    share = {name: kernel_share(variants[name]) for name in ("HF eager", "chatforge eager")}
    print(f"time in matmul + attention kernels (profiled step): HF eager {share['HF eager']:.0%}, chatforge eager "
          f"{share['chatforge eager']:.0%}; a model that ran only those kernels would be at most "
          f"{1 / share['HF eager']:.2f}x HF eager")


if __name__ == "__main__":
    from chatforge.machine import describe
    print(describe(), flush=True)
    main()
