"""Generation engine: KV-cached batched sampling, text streaming and chat on top of a GPT.

Prompts run through GPT.forward into a KV cache (`prefill`), then each new token does (`decode_step`); the
batcher (continuous batching) uses the same two calls. A batch left-pads its prompts to a common length:
each row keeps its own positions (counted from its first real token) and a padding mask hides the padding,
so a row's tokens are the same as when it runs alone (in fp32). One row on the CPU decodes through
cpu_decode.decode_one, a lean restatement of the forward for one token (about 2x faster for small models);
it must stay the same function as GPT.forward up to float rounding (tests compare their logits).
precision="bf16" (or auto where bf16 measures faster) runs prefill under bf16 autocast; decode steps stay fp32:
one token per row is bound by per-operation overhead and weight reads, and autocast's weight casts make it slower
(benchmarks/bench_prefill.py).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .cpu_decode import DecodeWeights, decode_one, plain_linears, prepare
from .distributed import autocast_ctx, pick_device
from .errors import UserError
from .machine import choose_precision
from .model import GPT, KVCache
from .quant import GROUP, int4_available
from .sampling import StopText, TextStream, sample_next
from .tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["Engine", "StopText", "TextStream", "sample_next"]


WEIGHTS = ("fp32", "int4")
# precision=auto: a prompt shorter than this (rows x tokens) is run in fp32 all the same. Autocast casts every
# weight to bf16 on each call; a short prompt's matmuls gain less than that costs (benchmarks/bench_prefill.py).
BF16_MIN_TOKENS = 64


class Engine:
    def __init__(self, model: GPT, tok: Tokenizer, device: str = "cpu", weights: str = "fp32",
                 precision: str = "fp32"):
        """weights="int4" (opt-in, CPU): single-row decoding reads 4-bit copies of the layers' projections and a
        bf16 vocabulary projection (src/chatforge/quant.py) - about 3x fewer bytes per token, at some accuracy;
        batches and the model itself stay fp32. The default "fp32" decodes with the model's numbers.
        precision (auto | fp32 | bf16, machine.choose_precision decides auto): of the prompt's forward (prefill);
        bf16 autocast there, fp32 weights kept; decode steps stay fp32 (see prefill). precision_why says why."""
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.tok = tok
        self.seq_len = model.cfg.seq_len
        if tok.vocab_size > model.cfg.vocab_size:
            raise UserError(f"tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}: "
                            "they come from different runs")
        if weights not in WEIGHTS:
            raise UserError(f"weights={weights!r} is not known; use one of {', '.join(WEIGHTS)}")
        if weights == "int4":
            c = model.cfg
            why = ("it runs on the CPU only" if self.device.type != "cpu" else
                   "the model must be fp32" if model.embed_tokens.weight.dtype != torch.float32 else
                   "this torch has no CPU int4 kernel" if not int4_available() else
                   f"the width ({c.n_embd}) and MLP size ({c.hidden()}) must be multiples of {GROUP}"
                   if c.n_embd % GROUP or c.hidden() % GROUP else
                   "adapter (LoRA) layers are not plain linear layers" if not plain_linears(model) else "")
            if why:
                raise UserError(f"weights='int4' is not available here: {why}")
        self.weights = weights
        self.precision, why = choose_precision(self.device, precision, model.cfg.n_embd)
        asked = str(precision).lower() in ("bf16", "bfloat16")
        self._bf16_from = 0 if asked else BF16_MIN_TOKENS  # prompt tokens from which prefill runs in bf16
        self.precision_why = why if self.precision == "fp32" else \
            f"{why}; for prompts{'' if asked else f' of {BF16_MIN_TOKENS}+ tokens'}, decode steps stay fp32"
        self._decode: tuple[tuple[int, ...], DecodeWeights | None] | None = None  # (parameter versions, weights)
        self._version_key: tuple[int, ...] | None = None  # parameter versions at the last prefill

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
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.model.cfg
        w = self.model.embed_tokens.weight
        return KVCache(c.n_layer, batch, c.n_kv_head, max_len, c.head_dim, device=w.device, dtype=w.dtype)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, cache: KVCache | None, *, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run ids (B, T) into the cache (at cache.pos, which advances); logits (B, vocab) of the last column.

        positions, mask: as GPT.forward's (a left-padded batch passes both). cache None: nothing is kept (the
        uncached path re-runs the whole sequence each step). Also brings decode_step's weight copies up to date
        with the model's parameters (an engine kept across training steps must not decode with stale copies).
        Runs under bf16 autocast when self.precision is bf16 (for auto, from BF16_MIN_TOKENS tokens); the logits
        are fp32 either way.
        """
        key = tuple(p._version for p in self.model.parameters())
        if self._decode is not None and self._decode[0] != key:
            self._decode = None  # stale: rebuilt by the next single-row step, if one comes
        self._version_key = key
        last = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        last[:, -1] = True  # the vocabulary projection only where we sample
        if self.precision == "fp32" or ids.numel() < self._bf16_from:
            return self.model(ids, position_ids=positions, mask=mask, kv_cache=cache, logits_at=last)
        with autocast_ctx(self.device, self.precision):
            logits = self.model(ids, position_ids=positions, mask=mask, kv_cache=cache, logits_at=last)
        return logits.float()

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, cache: KVCache, *, positions: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, greedy: bool = False) -> torch.Tensor:
        """One new token per row after what the cache holds: tokens (B, 1) -> logits (B, vocab).

        positions, mask: as GPT.forward's. greedy=True: the caller only takes the argmax, and the logits may be
        exact only near the maximum (a single row on a CPU with native bf16 reads a bf16 vocabulary projection).
        """
        dw = self._decode_weights() if tokens.shape[0] == 1 and mask is None else None
        if dw is not None:
            at = cache.pos if isinstance(cache.pos, int) else cache.pos[0]
            pos = at if positions is None else int(positions.reshape(-1)[0])
            return decode_one(self.model, dw, int(tokens.reshape(-1)[0]), pos, cache, greedy=greedy)
        return self.model(tokens, position_ids=positions, mask=mask, kv_cache=cache)[:, -1]

    def _decode_weights(self) -> DecodeWeights | None:
        """decode_one's weights, or None where it does not apply (not the CPU, not fp32, adapter layers). Built on
        the first single-row step, so batched decoding never pays for the copies; prefill drops them when a
        parameter has changed since (the version counters tell)."""
        if self._decode is None:
            m = self.model
            key = self._version_key or tuple(p._version for p in m.parameters())
            ok = (self.device.type == "cpu" and m.embed_tokens.weight.dtype == torch.float32 and plain_linears(m))
            self._decode = key, (prepare(m, int4=self.weights == "int4") if ok else None)
        return self._decode[1]

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
        ids = torch.tensor([[self.tok.pad_id] * (L - len(p)) + list(p) for p in prompts], device=dev)
        gen = None
        if seed is not None:
            gen = torch.Generator(device=dev)
            gen.manual_seed(seed)
        total = L + max_new_tokens
        mask = pos = None  # left padding: key j is real in row b iff j >= pad[b]; positions count from there
        if L > min(lens):
            pad = torch.tensor([L - n for n in lens], device=dev).unsqueeze(1)
            cols = torch.arange(total, device=dev).unsqueeze(0)
            mask, pos = cols >= pad, (cols - pad).clamp(min=0)
        cache = self.new_cache(B, total) if use_cache else None
        greedy = temperature <= 0 and repetition_penalty == 1.0

        def at(a: int, b: int) -> torch.Tensor | None:
            return None if pos is None else pos[:, a:b]

        # Inference mode is per thread and a generator may resume on another thread (a web server's pool),
        # so it is entered around each step's compute, never held across a yield.
        with torch.inference_mode():
            logits = self.prefill(ids, cache, positions=at(0, L), mask=mask)
            seq = torch.empty(B, total, dtype=ids.dtype, device=dev)  # prompt, then each sampled token
            seq[:, :L] = ids
        for step in range(max_new_tokens):
            t = L + step  # tokens in seq so far
            with torch.inference_mode():
                if step:  # the logits after the token sampled last time
                    if cache is not None:
                        logits = self.decode_step(seq[:, t - 1:t], cache, positions=at(t - 1, t), mask=mask,
                                                  greedy=greedy)
                    else:
                        logits = self.prefill(seq[:, :t], None, positions=at(0, t), mask=mask)
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
