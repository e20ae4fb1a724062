"""Single-row decoding on the CPU: the one specialised step beside GPT.forward.

Decoding one token of a small model is bound by per-operation overhead (and, for bigger models, by reading
the weights), not arithmetic. `decode_one` computes the same function as GPT.forward for one new token of
one row in about half the time at 4 layers x 256 (benchmarks/bench_generate.py: 2.7-3.0x transformers'
speed with it, 1.25x through GPT.forward): q/k/v and gate/up projections fused into one matmul each,
weights transposed to (in, out) (a vector-matrix product reads that layout faster: 1.2x for small
matrices, 1.85x for a 32k-vocabulary head, benchmarks/bench_matvec.py), each RMSNorm's weight folded into
the projection after it and its 1/rms applied as addmm's alpha, residual adds fused into addmm, RoPE on
the q and k heads at once with a roll instead of rotate-half, attention as two bmm over the cache's
(KV heads, group, D) layout, no module calls. torch.compile of this step was measured and not adopted:
~35 s of compilation for ~10%. Batches, GPUs and adapter (LoRA) layers decode through GPT.forward.

Greedy decoding on a CPU with native bf16 reads a bf16 copy of the vocabulary projection and recomputes in
fp32 only the rows that can still win (`greedy_head`: same argmax, ~6-12% faster for SmolLM2-135M).
weights="int4" reads 4-bit copies of the projections (quant.Int4Weight) and a bf16 vocabulary projection.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .model import GPT, KVCache
from .quant import Int4Weight


@functools.cache
def bf16_matmul_fast() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX): then a bf16 copy of the vocabulary
    projection is read in about half the time of the fp32 one (2.3 vs 4.2 ms for SmolLM2's 576 x 49152 on an
    AMD EPYC with avx512_bf16); without it oneDNN emulates bf16 and gains nothing. Linux's flags; elsewhere no."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def plain_linears(model: GPT) -> bool:
    """decode_one reads the projections' weights; wrapped layers (LoRA adapters) need their own forward."""
    return all(type(mod) is torch.nn.Linear for b in model.layers
               for mod in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj, b.self_attn.o_proj,
                           b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj))


class LayerWeights(NamedTuple):
    """One block as decode_one reads it. fp32: projections (in, out), the norm weights folded in (None).
    int4: projections as Int4Weight and the norm weights kept (folding would move the values off a GGUF
    file's 4-bit grid)."""
    attn_norm: torch.Tensor | None
    qkv: torch.Tensor | Int4Weight  # q, k and v projections, concatenated
    qk_norm: torch.Tensor | None  # (H + KV, D): q heads take q_norm's weight, k heads k_norm's; or no QK-norm
    o: torch.Tensor | Int4Weight
    mlp_norm: torch.Tensor | None
    gate_up: torch.Tensor | Int4Weight  # gate and up projections, concatenated
    down: torch.Tensor | Int4Weight


class Screen(NamedTuple):
    """The vocabulary projection in bf16 ((V, E): F.linear's layout is the faster one for bf16), and the
    largest row norm of its rounding error and of itself (see greedy_head)."""
    w: torch.Tensor
    err: float
    norm: float


class DecodeWeights(NamedTuple):
    layers: list[LayerWeights]
    head: torch.Tensor  # fp32: (E, V), the final norm's weight folded in; int4: (V, E) bf16
    int4: bool
    hidden: int  # MLP width
    sin_signed: torch.Tensor  # rotate_half(x) * sin == roll(x, D/2) * sin_signed (first half of sin negated)
    screen: Screen | None  # greedy_head's bf16 head, where it pays
    swap: torch.Tensor  # [1, 0]: swaps the halves of each head (the roll)
    zero: torch.Tensor  # baddbmm/addmm's ignored input (beta=0)


def prepare(model: GPT, int4: bool = False) -> DecodeWeights:
    """Copies of the weights laid out for decode_one (one more copy of the weights; int4: a sixth of it)."""
    c = model.cfg
    with torch.inference_mode():
        layers = []
        for b in model.layers:
            a, m = b.self_attn, b.mlp
            qk_norm = None
            if a.q_norm is not None:
                qk_norm = torch.cat([a.q_norm.weight.expand(c.n_head, -1), a.k_norm.weight.expand(c.n_kv_head, -1)])
            w_in, w_post = b.input_layernorm.weight, b.post_attention_layernorm.weight
            qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight])
            if int4:
                layers.append(LayerWeights(w_in, Int4Weight(qkv), qk_norm, Int4Weight(a.o_proj.weight), w_post,
                                           Int4Weight(gate_up), Int4Weight(m.down_proj.weight)))
            else:  # norm(x) @ W.T == (x * r) @ (w * W).T, r = rsqrt(mean(x^2) + eps)
                layers.append(LayerWeights(None, (qkv * w_in).t().contiguous(), qk_norm,
                                           a.o_proj.weight.t().contiguous(), None,
                                           (gate_up * w_post).t().contiguous(), m.down_proj.weight.t().contiguous()))
        w_head = model.lm_head.weight.detach()
        head = w_head.bfloat16() if int4 else (w_head * model.norm.weight).t().contiguous()
        half = c.head_dim // 2
        sin_signed = torch.cat([-model.rope_sin[:, :half], model.rope_sin[:, half:]], -1)
        screen = None
        if not int4 and bf16_matmul_fast():
            screen = screen_weights(w_head)
        dev, dt = w_head.device, w_head.dtype
        return DecodeWeights(layers, head, int4, c.hidden(), sin_signed, screen, torch.tensor([1, 0], device=dev),
                             torch.zeros(1, 1, 1, device=dev, dtype=dt))


def screen_weights(w: torch.Tensor) -> Screen:
    wb = w.bfloat16()
    err = torch.linalg.vector_norm(w - wb.float(), dim=1).max()
    return Screen(wb, float(err), float(torch.linalg.vector_norm(wb.float(), dim=1).max()))


def decode_one(model: GPT, dw: DecodeWeights, tok: int, pos: int, cache: KVCache,
               greedy: bool = False) -> torch.Tensor:
    """Logits (1, vocab) after token `tok` at position `pos`, which goes to cache column cache.pos (an int, or a
    list of one). Batch 1, CPU, fp32 model. greedy=True (the caller only takes the argmax): the logits may be
    exact only near the maximum (greedy_head); their argmax is the same."""
    c = model.cfg
    H, KV, D, E, eps = c.n_head, c.n_kv_head, c.head_dim, c.n_embd, c.norm_eps
    at = cache.pos if isinstance(cache.pos, int) else cache.pos[0]
    width = at + 1
    cos, sin = model.rope_cos[pos], dw.sin_signed[pos]
    # Work buffers, written in place: q/k/v heads, the q and k heads with their halves swapped, attention out.
    dev, dt = dw.zero.device, dw.zero.dtype
    qkv = torch.empty(1, (H + 2 * KV) * D, device=dev, dtype=dt)
    heads = qkv.view(H + 2 * KV, D)
    qk, kv_new = heads[:H + KV], heads[H:]  # q and k heads (RoPE); k and v heads (to the cache)
    rot = torch.empty(H + KV, D, device=dev, dtype=dt)
    qk_halves, rot_halves = qk.view(H + KV, 2, D // 2), rot.view(H + KV, 2, D // 2)
    q = heads[:H].view(KV, H // KV, D)  # q head h reads kv head h // (H / KV), as repeat_interleave
    y = torch.empty(KV, H // KV, D, device=dev, dtype=dt)
    y_flat = y.view(1, H * D)
    gu = torch.empty(1, 2 * dw.hidden, device=dev, dtype=dt)
    g, u = gu[:, :dw.hidden], gu[:, dw.hidden:]

    def inv_rms(x: torch.Tensor) -> float:  # one row: RMSNorm's scale is a number, addmm's alpha
        n = float(torch.linalg.vector_norm(x))
        return 1.0 / math.sqrt(n * n / E + eps)

    x = model.embed_tokens.weight[tok:tok + 1].clone()  # (1, E), updated in place
    for lw, buf in zip(dw.layers, cache.kv):
        if dw.int4:
            qkv.copy_(lw.qkv(F.rms_norm(x, (E,), lw.attn_norm, eps).bfloat16()))
        else:
            torch.addmm(qkv, x, lw.qkv, beta=0, alpha=inv_rms(x), out=qkv)
        if lw.qk_norm is not None:
            qk.copy_(F.rms_norm(qk, (D,), eps=eps) * lw.qk_norm)
        torch.index_select(qk_halves, 1, dw.swap, out=rot_halves)  # roll by D/2, no allocation
        qk.mul_(cos).addcmul_(rot, sin)
        kv = buf[0]  # (2 KV, S, D): keys, then values
        kv.select(1, at).copy_(kv_new)  # the roped key heads and the value heads, into column `at`
        s = torch.baddbmm(dw.zero, q, kv[:KV, :width].transpose(1, 2), beta=0, alpha=D ** -0.5)
        torch.bmm(s.softmax(-1), kv[KV:, :width], out=y)
        if dw.int4:
            x.add_(lw.o(y_flat.bfloat16()))
            gu.copy_(lw.gate_up(F.rms_norm(x, (E,), lw.mlp_norm, eps).bfloat16()))
        else:
            x.addmm_(y_flat, lw.o)
            torch.addmm(gu, x, lw.gate_up, beta=0, alpha=inv_rms(x), out=gu)
        torch.ops.aten.silu_(g).mul_(u)
        if dw.int4:
            x.add_(lw.down(g.bfloat16()))
        else:
            x.addmm_(g, lw.down)
    cache.advance(1)
    if dw.int4:
        return F.linear(F.rms_norm(x, (E,), model.norm.weight, eps).bfloat16(), dw.head).float()
    if greedy and dw.screen is not None:
        return greedy_head(x.mul_(inv_rms(x)).mul_(model.norm.weight), dw.screen, model.lm_head.weight)
    return torch.addmm(dw.zero.view(1, 1), x, dw.head, beta=0, alpha=inv_rms(x))


def greedy_head(h: torch.Tensor, screen: Screen, w: torch.Tensor) -> torch.Tensor:
    """Logits h @ w.T (h (1, E): after the final norm) whose argmax is that of the fp32 product, reading the
    bf16 copy of w (half the bytes: the head is a fifth of SmolLM2-135M's) plus a few fp32 rows.

    a = bf16(h) @ bf16(w).T (fp32 sums, rounded to bf16) is within B of each exact logit, with
    |h.w - hb.wb| <= |h| |w - wb| + |h - hb| |wb| (Cauchy-Schwarz, per row; the largest row norms are
    used), fp32 summation error <= E 2^-24 |hb| |wb| (doubled for margin), and the output's rounding, a
    relative 2^-8 (round to nearest is 2^-9: doubled). The true argmax is then among the rows whose a is
    within 2B (plus rounding) of max(a); those rows are recomputed in fp32 from w and written over a. Every
    other entry stays below the best recomputed one, so argmax is exact. Entries far from the maximum are
    only approximate: for greedy decoding only (no sampling, no penalty).
    """
    hb = h.bfloat16()
    nh = float(torch.linalg.vector_norm(h))
    nhb = float(torch.linalg.vector_norm(hb.float()))
    nd = float(torch.linalg.vector_norm(h - hb.float()))
    a = F.linear(hb, screen.w).float()
    top = float(a.max())
    bound = nh * screen.err + nd * screen.norm + 2 * h.shape[-1] * 2.0 ** -24 * nhb * screen.norm
    rel = 2.0 ** -7  # a is within rel * |t| of its unrounded value t (and so is t of a, near enough)
    lo_top = top - rel * abs(top) - bound  # the exact logit of max(a)'s row is at least this
    floor = lo_top - bound  # a row may win only if its a's upper bound (a + rel |a|) + bound reaches lo_top
    thr = floor / (1 + rel) if floor >= 0 else floor / (1 - rel)
    idx = (a[0] >= thr).nonzero().squeeze(1)
    a[0, idx] = F.linear(h, w.index_select(0, idx))[0]
    return a
