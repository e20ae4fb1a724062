"""The GPT: a decoder-only transformer, readable top to bottom.

Llama-shaped (RoPE, RMSNorm, no biases, SwiGLU, grouped-query attention) with optional QK-norm (then it
is Qwen3-shaped), so weights map one-to-one onto Hugging Face transformers for export. GPT.forward is the
one forward pass: training (packed documents, only the positions that matter) and generation (a KV cache,
left-padded batches) both call it. No parallelism or precision code lives here: DDP/FSDP, autocast and
compile are applied from outside (distributed.parallelize).
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
    """Keys and values of every layer for `batch` rows: per layer one (batch, 2 * KV heads, max_len, head_dim)
    buffer, keys then values (a decode step can store a new key and value with one copy).

    `pos` is the column the next token goes to: an int shared by all rows, or a list with one per row (rows
    of different lengths, as continuous batching has; such a cache takes one token per row per forward).
    GPT.forward writes there and advances it.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        self.kv = [torch.zeros(batch, 2 * n_kv_head, max_len, head_dim, device=device, dtype=dtype)
                   for _ in range(n_layer)]
        self.n_kv_head = n_kv_head
        self.max_len = max_len
        self.pos: int | list[int] = 0
        self._at: tuple[torch.Tensor, torch.Tensor] | None = None  # per-row pos as (rows, columns) indices

    def rows(self, start: int, stop: int, pos: int | list[int] = 0) -> KVCache:
        """A cache over rows [start, stop) of this one's buffers: views, so writes land here."""
        view = KVCache.__new__(KVCache)
        view.kv = [b[start:stop] for b in self.kv]
        view.n_kv_head, view.max_len, view.pos, view._at = self.n_kv_head, self.max_len, pos, None
        return view

    def end(self, t: int) -> int:
        """Columns in use once t more tokens per row are written."""
        return (self.pos if isinstance(self.pos, int) else max(self.pos)) + t

    def columns(self, t: int, device) -> torch.Tensor:
        """(1 or B, t): the cache column of each new token."""
        if isinstance(self.pos, int):
            return torch.arange(self.pos, self.pos + t, device=device).unsqueeze(0)
        return self._index(device)[1].unsqueeze(1)

    def _index(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._at is None:
            self._at = torch.arange(len(self.pos), device=device), torch.tensor(self.pos, device=device)
        return self._at

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, KV heads, t, D) at pos; return the keys and values of every column in use."""
        buf, n, t = self.kv[layer], self.n_kv_head, k.shape[2]
        if isinstance(self.pos, int):
            buf[:, :n, self.pos:self.pos + t] = k
            buf[:, n:, self.pos:self.pos + t] = v
        else:
            if t != 1:
                raise ValueError("a cache with a position per row takes one token per row at a time")
            rows, cols = self._index(k.device)
            buf[rows, :n, cols] = k[:, :, 0]
            buf[rows, n:, cols] = v[:, :, 0]
        end = self.end(t)
        return buf[:, :n, :end], buf[:, n:, :end]

    def advance(self, t: int) -> None:
        self.pos = self.pos + t if isinstance(self.pos, int) else [p + t for p in self.pos]
        self._at = None

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` columns of row src over row dst."""
        for buf in self.kv:
            buf[dst, :, :length] = buf[src, :, :length]


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
                mask: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, logits_at: torch.Tensor | None = None,
                active: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab). The one forward pass: training, evaluation and generation.

        position_ids: (B, T) positions (default: the token's cache column, or 0..T-1 without a cache).
        mask: (B, S) bool, False at keys that are padding (a left-padded batch), over the T tokens, or with a
        cache over its columns (S at least the columns in use after this call); padding is never attended
        (a token still sees itself, so padding rows stay finite). Attention is causal in any case.
        doc_ids: (B, T) document index of each token for packed sequences: attention stays inside a document.
        kv_cache: keys and values of earlier tokens; this call's are written at kv_cache.pos, which advances.
        logits_at: (B, T) bool: logits only at these positions, as (N, vocab) in row-major order. Chat
        fine-tuning learns a few positions per sequence, and with a large vocabulary the head is a big share
        of the step. active: (B, T) bool, a causal prefix of each row (e.g. up to its last target): only
        those positions are computed (training without a cache); logits_at must then lie inside it.
        """
        B, T = idx.shape
        if kv_cache is not None:
            if doc_ids is not None or active is not None:
                raise ValueError("doc_ids and active are for training: not with a kv_cache")
            cols, end = kv_cache.columns(T, idx.device), kv_cache.end(T)
            if position_ids is None:
                position_ids = cols.expand(B, T)
        else:
            cols, end = None, T
            if position_ids is None:
                position_ids = torch.arange(T, device=idx.device).unsqueeze(0).expand(B, T)
        if end > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {end} tokens exceeds the context length {self.cfg.seq_len}")
        cos = self.rope_cos[position_ids].unsqueeze(1)
        sin = self.rope_sin[position_ids].unsqueeze(1)
        attn_mask = _attention_mask(T, end, cols, mask, doc_ids, idx.device)
        rows = None
        if active is not None:  # (N, C) activations of the selected positions only
            sel = active.nonzero(as_tuple=True)
            rows = (sel, B, T)
            idx, cos, sin = idx[sel], cos.squeeze(1)[sel].unsqueeze(1), sin.squeeze(1)[sel].unsqueeze(1)
            if logits_at is not None:
                logits_at = logits_at[sel]
        x = self.embed_tokens(idx)
        for block in self.layers:
            x = block(x, cos, sin, attn_mask, kv_cache, rows)
        if kv_cache is not None:
            kv_cache.advance(T)
        if logits_at is not None:
            x = x[logits_at]
        return self.lm_head(self.norm(x))

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 * matmul params + attention (12 * layers * width * the context trained
        on: seq_len, default the model's own; fine-tuning often trains at a shorter one)."""
        c = self.cfg
        n = self.num_params() - self.embed_tokens.weight.numel() * (0 if c.tie_embeddings else 1)
        return 6 * n + 12 * c.n_layer * c.n_embd * (seq_len or c.seq_len)


def _attention_mask(T: int, S: int, cols: torch.Tensor | None, key_ok: torch.Tensor | None,
                    doc_ids: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, S) mask of the keys each query sees, or None when plain causal attention over
    the same T tokens (or one query over every key) is right: SDPA then takes its causal or unmasked path.
    cols (1 or B, T): the cache column of each query, None without a cache (query t is column t)."""
    if key_ok is None and doc_ids is None and (cols is None or (cols.shape[0] == 1 and (T == 1 or S == T))):
        return None  # without padding, a lone query sees every key, and S == T is the plain causal case
    j = torch.arange(S, device=device)
    q = cols if cols is not None else j.unsqueeze(0)  # (1 or B, T) the query's own column
    seen = j <= q.unsqueeze(-1)  # (1 or B, T, S): causal
    if doc_ids is not None:
        seen = seen & (doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2))
    if key_ok is not None:
        seen = (seen & key_ok[:, None, :S]) | (j == q.unsqueeze(-1))
    return seen.unsqueeze(1)


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
