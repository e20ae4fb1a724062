"""Training steps/s: our GPT vs transformers' LlamaForCausalLM of the same architecture (CPU, fp32).

Both get the same weights, batch, loss and AdamW step; only the model code differs.

    .venv/bin/python benchmarks/bench_train.py [--steps 20] [--layers 4] [--embd 256] [--seq 256] [--batch 8]
"""
from __future__ import annotations

import argparse
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


def bench(step_fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step_fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
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

    def make_step(model, logits_of):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = F.cross_entropy(logits_of(model, x).reshape(-1, a.vocab), y.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    ours_sps = bench(make_step(ours, lambda m, x: m(x)), a.steps)
    hf_sps = bench(make_step(theirs, lambda m, x: m(input_ids=x).logits), a.steps)
    tok = a.batch * a.seq
    print(f"model {ours.num_params() / 1e6:.2f}M params, batch {a.batch}x{a.seq}, {a.threads} threads, fp32 CPU")
    print(f"chatforge GPT      : {ours_sps:6.2f} steps/s ({ours_sps * tok:,.0f} tok/s)")
    print(f"HF LlamaForCausalLM: {hf_sps:6.2f} steps/s ({hf_sps * tok:,.0f} tok/s)")
    print(f"ratio ours/HF: {ours_sps / hf_sps:.2f}x")


if __name__ == "__main__":
    main()
