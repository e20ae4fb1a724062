"""Training tokens/s: our GPT vs transformers' LlamaForCausalLM of the same architecture, on this CPU, both precisions.

Every variant gets the same weights, batch, loss and optimizer (AdamW, fused on CPU as chatforge's trainer
uses it, fp32 master weights); only the model code, the precision and whether torch.compile is applied differ.
chatforge runs in the precision `train.precision=auto` picks here (printed, with the reason); transformers runs
in fp32 and in bf16 autocast (torch.autocast("cpu", dtype=torch.bfloat16) around the forward), so the ratio to
each is printed. The machine may be shared, so the variants run paired: each round times a few steps of every
variant back to back (rotating the order), and each ratio is the median over rounds of the per-round ratio.

    .venv/bin/python benchmarks/bench_train.py [--rounds 7] [--steps 2] [--threads 2] [--no-compile] [--hf-compile]
It also profiles one eager step of chatforge and of HF fp32 and prints the share of time spent in matrix
multiplies and attention kernels: 1 / (HF's share) bounds what any fp32 rewrite of the rest could gain.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from chatforge import machine
from chatforge.config import ModelConfig
from chatforge.distributed import autocast_ctx
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


def make_step(model, logits_of, x, y, vocab: int, precision: str = "fp32"):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # fused AdamW runs on CPU since torch 2.4

    def step():
        with autocast_ctx("cpu", precision):  # bf16: torch.autocast("cpu", dtype=torch.bfloat16); fp32: nothing
            logits = logits_of(model, x)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
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
    print(machine.describe(), flush=True)  # after set_num_threads: it names the thread count
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

    precision, why = machine.choose_precision(torch.device("cpu"), "auto", cfg.n_embd)
    ours_name = f"chatforge {precision}"

    # Each variant trains its own copy of the weights (the optimizer steps must not interfere).
    copy_of = copy.deepcopy

    def hf_logits(m, x):
        return m(input_ids=x).logits

    variants = {"HF fp32": make_step(copy_of(theirs), hf_logits, x, y, a.vocab),
                "HF bf16": make_step(copy_of(theirs), hf_logits, x, y, a.vocab, "bf16"),
                ours_name: make_step(copy_of(ours), lambda m, x: m(x), x, y, a.vocab, precision)}
    if not a.no_compile:
        m = copy_of(ours)
        cm = torch.compile(m)
        variants[f"{ours_name} compiled"] = make_step(m, lambda _, x: cm(x), x, y, a.vocab, precision)
    if a.hf_compile:
        m = copy_of(theirs)
        cm_hf = torch.compile(m)
        variants["HF fp32 compiled"] = make_step(m, lambda _, x: cm_hf(input_ids=x).logits, x, y, a.vocab)

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
    print(f"model {ours.num_params() / 1e6:.2f}M params, batch {a.batch}x{a.seq}, {a.threads} threads, CPU, "
          f"{a.rounds} rounds x {a.steps} steps, max |logit diff| ours vs HF (fp32) {diff:.1e}")
    print(f"chatforge train.precision=auto here: {why}")

    def ratio(name: str, base: str) -> str:
        r = sorted(b / t for b, t in zip(times[base], times[name]))
        return f"{statistics.median(r):.2f}x (min {r[0]:.2f}, max {r[-1]:.2f})"
    for name in names:
        sps = 1 / statistics.median(times[name])
        print(f"{name:26s}: {sps:6.3f} steps/s ({sps * tok:8,.0f} tok/s, median)  warm-up {warm[name]:.1f}s")
    for name in [n for n in names if n.startswith("chatforge")]:
        print(f"{name} / HF fp32: {ratio(name, 'HF fp32')};  {name} / HF bf16: {ratio(name, 'HF bf16')}")
    share = {name: kernel_share(variants[name]) for name in ("HF fp32", ours_name)}
    print(f"time in matmul + attention kernels (profiled step): HF fp32 {share['HF fp32']:.0%}, {ours_name} "
          f"{share[ours_name]:.0%}; an fp32 model that ran only those kernels would be at most "
          f"{1 / share['HF fp32']:.2f}x HF fp32")

if __name__ == "__main__":
    main()
