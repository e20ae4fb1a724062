"""The GPT: a decoder-only transformer, readable top to bottom.

Llama-shaped (RoPE, RMSNorm, no biases, SwiGLU, grouped-query attention) with optional QK-norm (then it
is Qwen3-shaped), so weights map one-to-one onto Hugging Face transformers for export. No parallelism or
precision code lives here: DDP/FSDP, autocast and compile are applied from outside (distributed.py, train.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like HF Llama does, so exported logits match under autocast too.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(max_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # HF "rotate_half" layout: no weight permutation on export
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (B, 1, T, D)
    d = x.shape[-1] // 2
    rotated = torch.cat([-x[..., d:], x[..., :d]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys/values for every layer; `pos` is how many positions are filled."""

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        self.k[layer][:, :, self.pos:self.pos + t] = k
        self.v[layer][:, :, self.pos:self.pos + t] = v
        end = self.pos + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        self.pos = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, rows=None):
        if rows is not None:
            return self._forward_rows(x, cos, sin, mask, *rows)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # mask None -> plain causal (flash kernels on GPU); otherwise an explicit boolean mask.
        is_causal = mask is None and k.shape[2] == T and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _forward_rows(self, x, cos, sin, mask, sel, B, T):
        """x (N, C): the positions sel = (batch index, time index) of a (B, T) batch, a causal prefix of each
        row. Projections run on those N rows only; attention runs on (B, T) tensors where the other positions
        are zeros, which no selected query sees (they come after it)."""
        N, D = x.shape[0], self.head_dim
        q = self.q_proj(x).view(N, self.n_head, D)
        k = self.k_proj(x).view(N, self.n_kv_head, D)
        v = self.v_proj(x).view(N, self.n_kv_head, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        def spread(t):  # (N, heads, D) -> (B, heads, T, D)
            return t.new_zeros(B, T, t.shape[1], D).index_put(sel, t).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            spread(q), spread(k), spread(v), attn_mask=mask, is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2)[sel].reshape(N, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden()
        self.gate_proj = nn.Linear(cfg.n_embd, h, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, h, bias=False)
        self.down_proj = nn.Linear(h, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask=None, cache=None, rows=None):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, rows))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
        if cfg.n_embd % cfg.n_head or cfg.n_head % cfg.n_kv_head:
            raise ValueError("n_embd must divide by n_head, and n_head by n_kv_head")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual projections scaled by 1/sqrt(2 * n_layer) (GPT-2) so the residual stream's variance stays put.
        out_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_at: torch.Tensor | None = None, active: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab).

        position_ids: (B, T) positions (default: 0..T-1, offset by the cache). doc_ids: (B, T) document index
        of each token for packed sequences: attention stays inside a document. cache: KV cache for generation.
        logits_at: (B, T) bool: logits only at these positions, as (N, vocab) in row-major order. Chat
        fine-tuning learns a few positions per sequence, and with a large vocabulary the head is a big share
        of the step. active: (B, T) bool, a causal prefix of each row (e.g. up to its last target): only
        those positions are computed (training without a cache); logits_at must then lie inside it.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=idx.device).unsqueeze(0).expand(B, T)
        if int(start + T) > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {self.cfg.seq_len}")
        cos = self.rope_cos[position_ids].unsqueeze(1)
        sin = self.rope_sin[position_ids].unsqueeze(1)
        mask = None
        if doc_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = (doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)) & causal
            mask = mask.unsqueeze(1)
        elif cache is not None and start > 0 and T > 1:
            # A chunk after a filled cache: each new token sees the whole cache plus the causal part of the chunk.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(diagonal=start)
        rows = None
        if active is not None and cache is None:  # (N, C) activations of the selected positions only
            sel = active.nonzero(as_tuple=True)
            rows = (sel, B, T)
            idx, cos, sin = idx[sel], cos.squeeze(1)[sel].unsqueeze(1), sin.squeeze(1)[sel].unsqueeze(1)
            if logits_at is not None:
                logits_at = logits_at[sel]
        x = self.embed_tokens(idx)
        for block in self.layers:
            x = block(x, cos, sin, mask, cache, rows)
        if cache is not None:
            cache.pos += T
        if logits_at is not None:
            x = x[logits_at]
        return self.lm_head(self.norm(x))

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 * matmul params + attention (12 * layers * width * context)."""
        c = self.cfg
        n = self.num_params() - self.embed_tokens.weight.numel() * (0 if c.tie_embeddings else 1)
        return 6 * n + 12 * c.n_layer * c.n_embd * c.seq_len

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        c = self.cfg
        p = self.embed_tokens.weight
        return KVCache(c.n_layer, batch, c.n_kv_head, max_len or c.seq_len, c.head_dim,
                       device=device or p.device, dtype=dtype or p.dtype)


def size_summary(cfg: ModelConfig) -> dict:
    """Parameter count and training FLOPs per token of a config, built on the meta device (no memory used)."""
    with torch.device("meta"):
        m = GPT(cfg)
    return {"params": m.num_params(), "non_embedding_params": m.num_params(non_embedding=True),
            "flops_per_token": m.flops_per_token()}


def main(argv: list[str] | None = None) -> None:
    """`python -m chatforge.model [PRESET ...]`: size of each preset (vocab from its tokenizer section)."""
    import argparse

    from .config import PRESET_DIR, load_config

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("presets", nargs="*", help="preset names or YAML files (default: every preset)")
    args = ap.parse_args(argv)
    names = args.presets or sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    print(f"{'preset':18s} {'layers':>6s} {'width':>6s} {'heads':>7s} {'context':>7s} {'vocab':>7s} "
          f"{'params':>9s} {'non-emb':>9s} {'GFLOPs/token':>12s}")
    for name in names:
        c = load_config(name)
        mc = c.model
        if not mc.vocab_size:
            mc.vocab_size = 256 if c.tokenizer.kind == "char" else c.tokenizer.vocab_size  # char: at most
        s = size_summary(mc)
        print(f"{name:18s} {mc.n_layer:6d} {mc.n_embd:6d} {mc.n_head:3d}/{mc.n_kv_head:<3d} {mc.seq_len:7d} "
              f"{mc.vocab_size:7d} {s['params'] / 1e6:8.1f}M {s['non_embedding_params'] / 1e6:8.1f}M "
              f"{s['flops_per_token'] / 1e9:12.3f}")


if __name__ == "__main__":
    main()
