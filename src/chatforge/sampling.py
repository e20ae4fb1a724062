"""Sampling the next token from logits, and turning sampled ids into text deltas that respect stop strings."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .tokenizer import IncrementalDecoder, Tokenizer


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
