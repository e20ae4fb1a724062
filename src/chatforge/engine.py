"""Generation engine: KV-cached batched sampling, text streaming and chat on top of a GPT.

Batching left-pads prompts to a common length. Each row keeps its own positions (counted from its first
real token) and an attention mask hides the padding, so a row's tokens are the same as when it runs alone.
The engine drives the model's blocks itself (embed -> blocks -> norm -> lm_head) because GPT.forward has
no padding mask; it also runs the vocabulary projection only for the last position, the one we sample from.

Decoding one token at a time is bound by per-operation overhead (and, for bigger models, by reading the
weights), not arithmetic: `_decode_step` is a lean re-statement of a block for a single new position: q/k/v
and gate/up projections fused into one matmul each; on CPU, weights transposed for vector-matrix products,
RMSNorm weights folded into the next projection and residual adds fused into addmm; RoPE on the q and k
heads at once with a roll instead of rotate-half's slice/negate/concatenate, in-place elementwise work, the
new key and value stored with one copy into a joint K/V buffer (FusedKVCache), no module-call machinery.
`_decode_one` goes further for the common single-row CPU case (chat, `generate`): norm scales as addmm's
alpha, attention as two bmm, preallocated buffers. Both must stay the same function as model.Block up to
float rounding; tests compare them with the plain forward and with transformers (same greedy tokens).
torch.compile of this step was measured and not adopted: on CPU it cost ~35 s of compilation for ~10%.
Greedy single-row decoding on a CPU with native bf16 reads a bf16 copy of the vocabulary projection and
recomputes in fp32 only the rows that can still win (`_greedy_head`: same argmax, ~6-12% faster for
SmolLM2-135M); Engine(weights="int4") is an opt-in 4-bit decode (`_decode_one_int4`, src/chatforge/quant.py).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UserError
from .model import GPT
from .tokenizer import IncrementalDecoder, Tokenizer


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def sample_next(logits: torch.Tensor, history: torch.Tensor | None, *, temperature: float, top_k: int,
                top_p: float, repetition_penalty: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). history (B, T): ids seen so far, for the repetition penalty."""
    logits = logits.float()
    if repetition_penalty != 1.0 and history is not None and history.numel():
        # CTRL / HF rule: shrink the score of every token already present (divide if > 0, multiply if < 0).
        seen = logits.gather(1, history)
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if not (0 < top_k < logits.shape[-1]) and not (0 < top_p < 1.0):
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
    # Only the candidates, best first: the top k (topk sorts them), or the whole vocabulary sorted for top-p.
    if 0 < top_k < logits.shape[-1]:
        cand, ids = torch.topk(logits, top_k, dim=-1)
    else:
        cand, ids = torch.sort(logits, dim=-1, descending=True)
    if 0 < top_p < 1.0:
        probs = cand.softmax(dim=-1)
        # Drop a candidate when the mass before it already reaches top_p; the top one always stays.
        cand = cand.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
    pick = torch.multinomial(cand.softmax(dim=-1), 1, generator=generator)
    return ids.gather(1, pick).squeeze(1)


class TextStream(Iterator[str]):
    """Iterator of text deltas; after it ends, `finish_reason` ("stop" | "length") and `n_tokens` are set."""

    def __init__(self, it: Iterator[str]):
        self._it = it
        self.finish_reason: str | None = None
        self.n_tokens = 0

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


@functools.cache
def _bf16_matmul_fast() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX): then a bf16 copy of the vocabulary
    projection is read in about half the time of the fp32 one (2.3 vs 4.2 ms for SmolLM2's 576 x 49152 on an
    AMD EPYC with avx512_bf16); without it oneDNN emulates bf16 and gains nothing. Linux's flags; elsewhere no."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


WEIGHTS = ("fp32", "int4")


class Engine:
    def __init__(self, model: GPT, tok: Tokenizer, device: str = "cpu", weights: str = "fp32"):
        """weights="int4" (opt-in, CPU): single-row decoding reads 4-bit copies of the layers' projections and a
        bf16 vocabulary projection (src/chatforge/quant.py) - about 3x fewer bytes per token, at some accuracy;
        the prompt, batches and the model itself stay fp32. The default "fp32" decodes with the model's numbers."""
        self.device = torch.device(pick_device(device))
        self.model = model.to(self.device).eval()
        self.tok = tok
        self.seq_len = model.cfg.seq_len
        if tok.vocab_size > model.cfg.vocab_size:
            raise UserError(f"tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}: "
                            "they come from different runs")
        if weights not in WEIGHTS:
            raise UserError(f"weights={weights!r} is not known; use one of {', '.join(WEIGHTS)}")
        if weights == "int4":
            from .quant import GROUP, int4_available

            c = model.cfg
            why = ("it runs on the CPU only" if self.device.type != "cpu" else
                   "the model must be fp32" if model.embed_tokens.weight.dtype != torch.float32 else
                   "this torch has no CPU int4 kernel" if not int4_available() else
                   f"the width ({c.n_embd}) and MLP size ({c.hidden()}) must be multiples of {GROUP}"
                   if c.n_embd % GROUP or c.hidden() % GROUP else
                   "adapter (LoRA) layers are not plain linear layers" if not self._plain_linears() else "")
            if why:
                raise UserError(f"weights='int4' is not available here: {why}")
        self.weights = weights

    @classmethod
    def from_run(cls, run_dir: Path, stage: str = "finetune", which: str = "best", device: str = "auto") -> "Engine":
        """Tokenizer from run_dir/tokenizer, weights from run_dir/<stage>/ckpt/<which>."""
        from .checkpoint import load_model, resolve_checkpoint  # imported late: the trainer's module

        if stage not in ("finetune", "pretrain"):
            raise UserError(f"stage {stage!r} is not known; use finetune or pretrain")
        run_dir = Path(run_dir)
        tok = Tokenizer.load(run_dir / "tokenizer")
        ckpt = resolve_checkpoint(run_dir / stage / "ckpt", which)
        dev = pick_device(device)
        model, meta = load_model(ckpt, device=dev)
        want = meta.get("tokenizer_hash") if isinstance(meta, dict) else None
        if want and want != tok.hash:
            raise UserError(f"{ckpt} was trained with tokenizer {want}, but {run_dir / 'tokenizer'} is {tok.hash}")
        return cls(model, tok, device=dev)

    # ---- the forward pass -----------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> "FusedKVCache":
        c = self.model.cfg
        w = self.model.embed_tokens.weight
        return FusedKVCache(c.n_layer, batch, c.n_kv_head, max_len, c.head_dim, device=w.device, dtype=w.dtype)

    def _prepared(self) -> list[tuple[torch.Tensor, ...]]:
        """Per layer: (input norm, fused q/k/v, q/k norm or None, o, post norm, fused gate/up, down) weights.

        Projections are copies laid out for `self._lin`: on CPU transposed to (in, out), because a
        vector-matrix product reads that layout faster than F.linear's (out, in): about 1.2x for small
        matrices, 1.85x for a 32k-vocabulary head (benchmarks/bench_matvec.py); elsewhere F.linear's layout. q/k/v and gate/up are concatenated. On CPU
        (fp32) each RMSNorm's weight is also folded into the projection after it (norm(x) @ W == (x * r) @
        (w * W), r = rsqrt(mean(x^2) + eps)), and its entry is None: the norm is then four cheap operations.
        The copies are made on first use and again whenever a parameter has changed since (an Engine kept
        across training steps must not decode with stale copies); they cost one more copy of the weights.
        """
        key = tuple(p._version for p in self.model.parameters())
        if getattr(self, "_layers_key", None) != key:
            c = self.model.cfg
            cpu = self.device.type == "cpu" and self.model.embed_tokens.weight.dtype == torch.float32
            self._lin = torch.mm if cpu else F.linear
            self._lin_add = torch.addmm if cpu else (lambda x, y, w: x + F.linear(y, w))  # x + y @ W

            def lay(*ws: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
                w = torch.cat(ws) if len(ws) > 1 else ws[0]
                if not cpu:
                    return w
                return (w * norm if norm is not None else w).t().contiguous()

            def folded(norm: torch.Tensor) -> torch.Tensor | None:
                return None if cpu else norm

            with torch.inference_mode():
                layers = []
                for b in self.model.layers:
                    a = b.self_attn
                    qk_norm = None
                    if a.q_norm is not None:  # one (H + KV, D) weight: q heads use q_norm's, k heads k_norm's
                        qk_norm = torch.cat([a.q_norm.weight.expand(c.n_head, -1),
                                             a.k_norm.weight.expand(c.n_kv_head, -1)])
                    w_in, w_post = b.input_layernorm.weight, b.post_attention_layernorm.weight
                    layers.append((folded(w_in), lay(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, norm=w_in),
                                   qk_norm, lay(a.o_proj.weight), folded(w_post),
                                   lay(b.mlp.gate_proj.weight, b.mlp.up_proj.weight, norm=w_post),
                                   lay(b.mlp.down_proj.weight)))
                w_norm = self.model.norm.weight
                self._final_norm, self._head = folded(w_norm), lay(self.model.lm_head.weight, norm=w_norm)
                self._eps = torch.tensor(c.norm_eps, device=self.device)
                # rotate_half(x) * sin == roll(x, D/2) * sin_signed, with the first half of sin negated (exact).
                half = c.head_dim // 2
                self._sin_signed = torch.cat([-self.model.rope_sin[:, :half], self.model.rope_sin[:, half:]], -1)
                self._screen = self._screen_weights() if cpu and _bf16_matmul_fast() else None
                self._q_layers = self._int4_weights() if self.weights == "int4" else None
            self._layers, self._layers_key = layers, key
        return self._layers

    def _screen_weights(self) -> tuple[torch.Tensor, float, float]:
        """For greedy decoding: the vocabulary projection in bf16 ((V, E): F.linear's layout is the faster one
        for bf16), the largest row norm of its rounding error and of itself (see _greedy_head)."""
        w = self.model.lm_head.weight.detach()
        wb = w.bfloat16()
        err = torch.linalg.vector_norm(w - wb.float(), dim=1).max()
        return wb, float(err), float(torch.linalg.vector_norm(wb.float(), dim=1).max())

    def _int4_weights(self) -> tuple[list[tuple], object]:
        """weights="int4": per layer (input norm, q/k/v, q/k norm or None, o, post norm, gate/up, down), the
        projections as quant.Int4Weight (norm weights not folded: that would move the values off a GGUF file's
        4-bit grid), and the vocabulary projection in bf16 ((V, E), F.linear)."""
        from .quant import Int4Weight

        c = self.model.cfg
        layers = []
        for b in self.model.layers:
            a = b.self_attn
            qk_norm = None
            if a.q_norm is not None:
                qk_norm = torch.cat([a.q_norm.weight.expand(c.n_head, -1), a.k_norm.weight.expand(c.n_kv_head, -1)])
            layers.append((b.input_layernorm.weight,
                           Int4Weight(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                           qk_norm, Int4Weight(a.o_proj.weight), b.post_attention_layernorm.weight,
                           Int4Weight(torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight])),
                           Int4Weight(b.mlp.down_proj.weight)))
        return layers, self.model.lm_head.weight.detach().bfloat16()

    def _plain_linears(self) -> bool:
        """The fused decode step reads the projections' weights; wrapped layers (LoRA adapters) need their forward."""
        return all(type(mod) is torch.nn.Linear for b in self.model.layers
                   for mod in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj, b.self_attn.o_proj,
                               b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj))

    def _norm(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        eps = self.model.cfg.norm_eps
        if w is None:  # the weight is folded into the next projection: x * rsqrt(mean(x^2) + eps)
            n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            return x * torch.addcmul(self._eps, n, n, value=1 / x.shape[-1]).rsqrt_()
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * w  # fp32 statistics, as RMSNorm

    def _decode_step(self, tok: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                     cache: "FusedKVCache") -> torch.Tensor:
        """One new token per row after a filled cache: tok, pos (B, 1) -> logits (B, vocab). Same math as Block.

        Activations stay 2-D (B, features) and most elementwise work happens in place; RoPE is applied to the q
        and k heads together, and the new key and value go into the cache with one copy. cache.pos is the
        column the new key goes to: an int shared by all rows, or a (B,) tensor, a column per row (the batcher's
        rows have different lengths; then `mask` must hide each row's columns past its own).
        """
        m, c = self.model, self.model.cfg
        layers, lin, lin_add = self._layers, self._lin, self._lin_add  # from _prepared(), once per generation
        B = tok.shape[0]
        H, KV, D = c.n_head, c.n_kv_head, c.head_dim
        hid = layers[0][6].shape[0 if lin is torch.mm else 1]
        cos = m.rope_cos[pos].unsqueeze(1)  # (B, 1, 1, D): broadcasts over the heads of (B, heads, 1, D)
        sin = self._sin_signed[pos].unsqueeze(1)
        at = cache.pos
        per_row = not isinstance(at, int)
        width = cache.width if per_row else at + 1
        rows = torch.arange(B, device=tok.device) if per_row else None
        x = F.embedding(tok[:, 0], m.embed_tokens.weight)  # (B, E)
        for buf, k, v, (w_in, w_qkv, w_qkn, w_o, w_post, w_gu, w_down) in zip(cache.kv, *cache.kv_views(), layers):
            qkv = lin(self._norm(x, w_in), w_qkv).view(B, H + 2 * KV, 1, D)  # heads as (B, heads, 1, D)
            qk = qkv[:, :H + KV]
            if w_qkn is not None:
                qk.copy_(F.rms_norm(qk.float(), (D,), eps=c.norm_eps).to(qk.dtype) * w_qkn.unsqueeze(1))
            rot = torch.roll(qk, D // 2, -1)
            qk.mul_(cos).addcmul_(rot, sin)
            if per_row:
                buf[rows, :, at] = qkv[:, H:, 0]
            else:
                buf[:, :, at:at + 1] = qkv[:, H:]  # roped key heads, then value heads
            y = F.scaled_dot_product_attention(qkv[:, :H], k[:, :, :width], v[:, :, :width], attn_mask=mask,
                                               enable_gqa=KV != H)
            x = lin_add(x, y.view(B, H * D), w_o)
            gu = lin(self._norm(x, w_post), w_gu)
            x = lin_add(x, F.silu(gu[:, :hid]).mul_(gu[:, hid:]), w_down)
        cache.pos += 1
        return lin(self._norm(x, self._final_norm), self._head)

    def _decode_one(self, tok: torch.Tensor, pos: torch.Tensor, mask: None, cache: "FusedKVCache",
                    greedy: bool = False) -> torch.Tensor:
        """_decode_step for a single row on CPU (fp32, the folded (in, out) weights, an int cache.pos).

        One row lets each RMSNorm's scale be a Python number: one reduction, then addmm's alpha applies it
        inside the projection (norm(x) @ W' == r * (x @ W')). Attention is two bmm over the cache's (KV heads,
        group, D) layout, and the projections write into buffers made once per cache: about half the
        operations of _decode_step, whose time at this size is mostly per-operation overhead.
        greedy=True (the caller only takes the argmax): the logits may be exact only near the maximum
        (_greedy_head), their argmax is the same.
        """
        c = self.model.cfg
        H, KV, D, E, eps = c.n_head, c.n_kv_head, c.head_dim, c.n_embd, c.norm_eps
        work = cache.one_row(H, self._layers[0][6].shape[0])
        p, at = int(pos), cache.pos
        width = at + 1
        cos = self.model.rope_cos[p]
        sin = self._sin_signed[p]

        def scale(x: torch.Tensor) -> float:  # RMSNorm's 1 / rms(x), its weight folded into the next matmul
            n = float(torch.linalg.vector_norm(x))
            return 1.0 / math.sqrt(n * n / E + eps)

        x = self.model.embed_tokens.weight.index_select(0, tok.view(1))  # (1, E), a new tensor: updated in place
        for (_, w_qkv, w_qkn, w_o, _, w_gu, w_down), kT, v, buf in zip(self._layers, *work.layer_views):
            torch.addmm(work.qkv, x, w_qkv, beta=0, alpha=scale(x), out=work.qkv)
            qk = work.qk  # (H + KV, D): the q heads, then the k heads
            if w_qkn is not None:
                qk.copy_(F.rms_norm(qk, (D,), eps=eps) * w_qkn)
            torch.index_select(work.qk_halves, 1, work.swap, out=work.rot_halves)  # roll by D/2, no allocation
            qk.mul_(cos).addcmul_(work.rot, sin)
            buf.select(1, at).copy_(work.kv_new)  # the roped key heads and the value heads, into column `at`
            s = torch.baddbmm(work.zero, work.q, kT.narrow(2, 0, width), beta=0, alpha=D ** -0.5)
            torch.bmm(s.softmax(-1), v.narrow(1, 0, width), out=work.y)
            x.addmm_(work.y_flat, w_o)
            torch.addmm(work.gu, x, w_gu, beta=0, alpha=scale(x), out=work.gu)
            torch.ops.aten.silu_(work.g).mul_(work.u)
            x.addmm_(work.g, w_down)
        cache.pos += 1
        if greedy and self._screen is not None:
            return self._greedy_head(x.mul_(scale(x)).mul_(self.model.norm.weight))
        return torch.addmm(work.zero2, x, self._head, beta=0, alpha=scale(x))

    def _greedy_head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits h @ W.T (h (1, E): after the final norm) whose argmax is that of the fp32 product, reading
        the bf16 copy of W (half the bytes: the head is a fifth of SmolLM2-135M's) plus a few fp32 rows.

        a = bf16(h) @ bf16(W).T (fp32 sums, rounded to bf16) is within B of each exact logit, with
        |h.w - hb.wb| <= |h| |w - wb| + |h - hb| |wb| (Cauchy-Schwarz, per row; the largest row norms are
        used), fp32 summation error <= E 2^-24 |hb| |wb| (doubled for margin), and the output's rounding, a
        relative 2^-8 (round to nearest is 2^-9: doubled). The true argmax is then among the rows whose a is
        within 2B (plus rounding) of max(a); those rows are recomputed in fp32 from the model's own weight and
        written over a. Every other entry stays below the best recomputed one, so argmax is exact. Entries far
        from the maximum are only approximate: used for greedy decoding only (no sampling, no penalty).
        """
        wb, err_w, norm_w = self._screen
        hb = h.bfloat16()
        nh = float(torch.linalg.vector_norm(h))
        nhb = float(torch.linalg.vector_norm(hb.float()))
        nd = float(torch.linalg.vector_norm(h - hb.float()))
        a = F.linear(hb, wb).float()
        top = float(a.max())
        bound = nh * err_w + nd * norm_w + 2 * h.shape[-1] * 2.0 ** -24 * nhb * norm_w
        rel = 2.0 ** -7  # a is within rel * |t| of its unrounded value t (and so is t of a, near enough)
        lo_top = top - rel * abs(top) - bound  # the exact logit of max(a)'s row is at least this
        y = lo_top - bound  # a row may win only if its a's upper bound (a + rel |a|) + bound reaches lo_top
        thr = y / (1 + rel) if y >= 0 else y / (1 - rel)
        idx = (a[0] >= thr).nonzero().squeeze(1)
        a[0, idx] = F.linear(h, self.model.lm_head.weight.index_select(0, idx))[0]
        return a

    def _decode_one_int4(self, tok: torch.Tensor, pos: torch.Tensor, mask: None, cache: "FusedKVCache",
                         greedy: bool = False) -> torch.Tensor:
        """_decode_one with weights="int4": projections through quant.Int4Weight (bf16 in, bf16 out), the
        residual stream, norms, RoPE and attention in fp32, the vocabulary projection in bf16."""
        c = self.model.cfg
        H, KV, D, E, eps = c.n_head, c.n_kv_head, c.head_dim, c.n_embd, c.norm_eps
        layers, head = self._q_layers
        hid = self._layers[0][6].shape[0]
        work = cache.one_row(H, hid)
        p, at = int(pos), cache.pos
        width = at + 1
        cos = self.model.rope_cos[p]
        sin = self._sin_signed[p]
        x = self.model.embed_tokens.weight.index_select(0, tok.view(1))
        for (w_in, w_qkv, w_qkn, w_o, w_post, w_gu, w_down), kT, v, buf in zip(layers, *work.layer_views):
            work.qkv.copy_(w_qkv(F.rms_norm(x, (E,), w_in, eps).bfloat16()))
            qk = work.qk
            if w_qkn is not None:
                qk.copy_(F.rms_norm(qk, (D,), eps=eps) * w_qkn)
            torch.index_select(work.qk_halves, 1, work.swap, out=work.rot_halves)
            qk.mul_(cos).addcmul_(work.rot, sin)
            buf.select(1, at).copy_(work.kv_new)
            s = torch.baddbmm(work.zero, work.q, kT.narrow(2, 0, width), beta=0, alpha=D ** -0.5)
            torch.bmm(s.softmax(-1), v.narrow(1, 0, width), out=work.y)
            x.add_(w_o(work.y_flat.bfloat16()))
            work.gu.copy_(w_gu(F.rms_norm(x, (E,), w_post, eps).bfloat16()))
            torch.ops.aten.silu_(work.g).mul_(work.u)
            x.add_(w_down(work.g.bfloat16()))
        cache.pos += 1
        return F.linear(F.rms_norm(x, (E,), self.model.norm.weight, eps).bfloat16(), head).float()

    def _forward(self, idx: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                 cache: "FusedKVCache | None") -> torch.Tensor:
        """Logits of the last position. idx, pos (B, T); mask (B, 1, T, S) bool or None (plain causal)."""
        m = self.model
        cos = m.rope_cos[pos].unsqueeze(1)
        sin = m.rope_sin[pos].unsqueeze(1)
        x = m.embed_tokens(idx)
        for block in m.layers:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += idx.shape[1]
        return m.lm_head(m.norm(x[:, -1]))

    def _token_steps(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float, top_k: int,
                     top_p: float, repetition_penalty: float, seed: int | None,
                     use_cache: bool) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, (B,) on the CPU, max_new_tokens times (callers stop early)."""
        B = len(prompts)
        lens = [len(p) for p in prompts]
        if min(lens) == 0:
            raise UserError("prompt is empty: give at least one token (e.g. the tokenizer's bos id)")
        L = max(lens)
        if L >= self.seq_len:
            raise UserError(f"prompt of {L} tokens leaves no room in the context of {self.seq_len} tokens")
        max_new_tokens = min(max_new_tokens, self.seq_len - L)
        dev = self.device
        pad = torch.tensor([L - n for n in lens], device=dev)  # left padding of each row
        ids = torch.tensor([[self.tok.pad_id] * (L - len(p)) + list(p) for p in prompts], device=dev)
        padded = bool(pad.any())
        gen = None
        if seed is not None:
            gen = torch.Generator(device=dev)
            gen.manual_seed(seed)
        total = L + max_new_tokens
        # Key j is visible to row b iff j >= pad[b]; a query always sees itself, so padding rows stay finite.
        key_ok = torch.arange(total, device=dev).unsqueeze(0) >= pad.unsqueeze(1)  # (B, total)
        cache = self.new_cache(B, total) if use_cache else None
        fast = self._plain_linears()
        if fast and use_cache:
            self._prepared()  # (re)build the fused weights once per call, not per token

        def full_mask(t: int) -> torch.Tensor | None:
            if not padded:
                return None
            causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
            return ((causal & key_ok[:, None, :t]) | torch.eye(t, dtype=torch.bool, device=dev)).unsqueeze(1)

        # Inference mode is per thread and a generator may resume on another thread (a web server's pool),
        # so it is entered around each step's compute, never held across a yield.
        with torch.inference_mode():
            pos_all = (torch.arange(total, device=dev).unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)
            logits = self._forward(ids, pos_all[:, :L], full_mask(L), cache)
            seq = torch.empty(B, total, dtype=ids.dtype, device=dev)  # prompt, then each sampled token
            seq[:, :L] = ids
        step_fn = self._decode_step if fast else self._forward
        if fast and use_cache and B == 1 and self._lin is torch.mm:
            # greedy: only the argmax of the logits is used (_decode_one may then read a bf16 head)
            greedy = temperature <= 0 and repetition_penalty == 1.0
            one = self._decode_one_int4 if self.weights == "int4" else self._decode_one
            step_fn = functools.partial(one, greedy=greedy)
        for step in range(max_new_tokens):
            t = L + step  # tokens in seq so far
            with torch.inference_mode():
                if step:  # the logits after the token sampled last time
                    if cache is not None:
                        mask = key_ok[:, None, None, :t] if padded else None
                        logits = step_fn(seq[:, t - 1:t], pos_all[:, t - 1:t], mask, cache)
                    else:
                        logits = self._forward(seq[:, :t], pos_all[:, :t], full_mask(t), None)
                nxt = sample_next(logits, seq[:, :t], temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, generator=gen)
                seq[:, t] = nxt
                nxt_cpu = nxt.cpu()
            yield nxt_cpu

    # ---- public generation API --------------------------------------------------------------------
    def generate(self, prompt_ids: list[int] | list[list[int]], max_new_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 50, top_p: float = 0.95, repetition_penalty: float = 1.0,
                 stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), seed: int | None = None,
                 use_cache: bool = True) -> list[list[int]]:
        """New token ids per prompt (one list per prompt, also for a single flat prompt).

        A row ends with its first stop id (included, as in transformers: the caller sees why it ended), or with
        the token that completes a stop string (tokens do not split at string boundaries), or after
        max_new_tokens / at the end of the context.
        """
        prompts = [list(prompt_ids)] if prompt_ids and isinstance(prompt_ids[0], int) else [list(p) for p in prompt_ids]
        if not prompts:
            return []
        stops = set(int(i) for i in stop_ids)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        decoders = [IncrementalDecoder(self.tok) for _ in prompts] if stop_strings else None
        texts = [""] * len(prompts)
        steps = self._token_steps(prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, seed=seed, use_cache=use_cache)
        for nxt in steps:
            for b, t in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                out[b].append(t)
                if t in stops:
                    done[b] = True
                    continue
                if decoders is not None:
                    texts[b] += decoders[b].push(t)
                    if any(s in texts[b] for s in stop_strings):
                        done[b] = True
            if all(done):
                steps.close()
                break
        return out

    def stream(self, prompt_ids: list[int], max_new_tokens: int = 128, temperature: float = 0.8, top_k: int = 50,
               top_p: float = 0.95, repetition_penalty: float = 1.0, stop_ids: Sequence[int] = (),
               stop_strings: Sequence[str] = (), seed: int | None = None, use_cache: bool = True) -> TextStream:
        """Text deltas of one prompt's continuation; never splits a UTF-8 character, never shows a stop string."""
        if prompt_ids and not isinstance(prompt_ids[0], int):
            raise UserError("stream takes one prompt (a list of ids); use generate for a batch")
        stream = TextStream(iter(()))

        def run() -> Iterator[str]:
            text = StopText(self.tok, stop_ids, stop_strings)
            steps = self._token_steps([list(prompt_ids)], max_new_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                                      use_cache=use_cache)
            try:
                for nxt in steps:
                    delta = text.push(int(nxt[0]))
                    stream.n_tokens = text.n_tokens
                    if delta:
                        yield delta
                    if text.stopped:
                        break
            finally:
                steps.close()
            tail = text.end()
            stream.finish_reason = "stop" if text.stopped else "length"
            if tail:
                yield tail

        stream._it = run()
        return stream

    # ---- chat -----------------------------------------------------------------------------------------
    def fit_messages(self, messages: list[dict], max_new_tokens: int) -> list[dict]:
        """Drop the oldest non-system turns until the prompt plus max_new_tokens fits in the context."""
        msgs = list(messages)
        while True:
            n = len(self.tok.render_chat(msgs, add_generation_prompt=True)[0])
            if n + max_new_tokens <= self.seq_len:
                return msgs
            first = 1 if msgs and msgs[0].get("role") == "system" else 0
            if len(msgs) - first <= 1:  # only the latest message is left: it alone is too long
                if n >= self.seq_len:
                    raise UserError(f"the message is {n} tokens, longer than the context of {self.seq_len}; "
                                    "shorten it")
                return msgs  # generation is cut at the end of the context instead
            del msgs[first]

    def chat_stream(self, messages: list[dict], max_new_tokens: int = 256, **sampling) -> TextStream:
        msgs = self.fit_messages(messages, max_new_tokens)
        ids, _ = self.tok.render_chat(msgs, add_generation_prompt=True)
        stop_ids = set(sampling.pop("stop_ids", ())) | set(self.tok.stop_ids)
        return self.stream(ids, max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids), **sampling)

    def chat(self, messages: list[dict], max_new_tokens: int = 256, **sampling) -> str:
        return "".join(self.chat_stream(messages, max_new_tokens=max_new_tokens, **sampling))

    def complete_prompt(self, text: str) -> list[int]:
        """Ids of a plain-text prompt, as documents looked in training (chatforge's start with <|bos|>)."""
        return self.tok.with_bos(self.tok.encode(text))


class StopText:
    """Token ids -> text deltas for one reply: never splits a UTF-8 character, never shows a stop string.

    push() returns the text that is safe to show now; text that might be the start of a stop string is held
    back until it is known not to be one. After a stop id or stop string, `stopped` is True; end() returns
    what is left to show (the held-back text, and after a length cut the last incomplete bytes' best decoding).
    """

    def __init__(self, tok: Tokenizer, stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = ()):
        self.dec = IncrementalDecoder(tok)
        self.stop_ids = set(int(i) for i in stop_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.pending = ""
        self.stopped = False
        self.n_tokens = 0  # tokens of the reply (a stop id is not counted)

    def push(self, t: int) -> str:
        if t in self.stop_ids:
            self.stopped = True
            return ""
        self.n_tokens += 1
        self.pending += self.dec.push(t)
        if not self.pending:
            return ""
        hit = min((i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if hit >= 0:
            self.pending = self.pending[:hit]
            self.stopped = True
            return ""
        keep = _held_back(self.pending, self.stop_strings)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def end(self) -> str:
        out = self.pending + ("" if self.stopped else self.dec.flush())
        self.pending = ""
        return out


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class FusedKVCache:
    """Keys and values of every layer, one (B, 2 * KV heads, S, D) buffer per layer: keys first, then values.

    It answers Attention's `update` like model.KVCache (the prefill runs the model's own blocks), and lets a
    decode step store a new key and value with one copy, straight from the fused q/k/v projection.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        self.kv = [torch.zeros(batch, 2 * n_kv_head, max_len, head_dim, device=device, dtype=dtype)
                   for _ in range(n_layer)]
        self.n_kv_head = n_kv_head
        self.max_len = max_len
        self.pos = 0  # next column to write: an int for all rows, or a (B,) tensor (then `width` is set)
        self.width = 0
        self._views: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._one: _OneRow | None = None

    def kv_views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, the key part and the value part of its buffer (views, made once)."""
        if self._views is None:
            n = self.n_kv_head
            self._views = [b[:, :n] for b in self.kv], [b[:, n:] for b in self.kv]
        return self._views

    def rows(self, start: int, stop: int, pos: "int | torch.Tensor" = 0, width: int = 0) -> "FusedKVCache":
        """A cache over rows [start, stop) of this one's buffers (views: writes land here)."""
        view = FusedKVCache.__new__(FusedKVCache)
        view.kv = [b[start:stop] for b in self.kv]
        view.n_kv_head, view.max_len, view.pos, view.width = self.n_kv_head, self.max_len, pos, width
        view._views = view._one = None
        return view

    def one_row(self, n_head: int, hidden: int) -> "_OneRow":
        """The buffers and cache views Engine._decode_one works with (batch 1), made on first use."""
        if self._one is None:
            self._one = _OneRow(self, n_head, hidden)
        return self._one

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buf, n, end = self.kv[layer], self.n_kv_head, self.pos + k.shape[2]
        buf[:, :n, self.pos:end] = k
        buf[:, n:, self.pos:end] = v
        return buf[:, :n, :end], buf[:, n:, :end]


class _OneRow:
    """Engine._decode_one's buffers, views into them, and per layer the cache as (KV, D, S) keys and (KV, S, D)
    values, and the whole (2 KV, S, D) buffer, whose column `at` takes the new key and value heads."""

    def __init__(self, cache: FusedKVCache, H: int, hidden: int):
        KV, D = cache.n_kv_head, cache.kv[0].shape[-1]
        dev, dt = cache.kv[0].device, cache.kv[0].dtype
        self.qkv = torch.empty(1, (H + 2 * KV) * D, device=dev, dtype=dt)
        rows = self.qkv.view(H + 2 * KV, D)
        self.qk, self.kv_new = rows[:H + KV], rows[H:]
        self.rot = torch.empty(H + KV, D, device=dev, dtype=dt)  # qk with its halves swapped, for RoPE
        self.qk_halves, self.rot_halves = self.qk.view(H + KV, 2, D // 2), self.rot.view(H + KV, 2, D // 2)
        self.swap = torch.tensor([1, 0], device=dev)
        self.q = rows[:H].view(KV, H // KV, D)  # q head h reads kv head h // (H / KV), as repeat_interleave
        self.y = torch.empty(KV, H // KV, D, device=dev, dtype=dt)
        self.y_flat = self.y.view(1, H * D)
        self.gu = torch.empty(1, 2 * hidden, device=dev, dtype=dt)
        self.g, self.u = self.gu[:, :hidden], self.gu[:, hidden:]
        self.zero = torch.zeros(1, 1, 1, device=dev, dtype=dt)  # baddbmm/addmm's ignored input (beta=0)
        self.zero2 = self.zero.view(1, 1)
        bufs = [b[0] for b in cache.kv]  # (2 KV, S, D)
        self.layer_views = [b[:KV].transpose(1, 2) for b in bufs], [b[KV:] for b in bufs], bufs
