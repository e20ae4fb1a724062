"""Batches for training and evaluation.

Pretraining (TokenLoader): contiguous windows of seq_len+1 tokens cut from memory-mapped token arrays. Each
epoch draws a seeded random grid shift and a seeded permutation of the window indices (one int64 per window,
never the tokens themselves), so memory stays flat however large the corpus. Fine-tuning (SFTLoader): chat
examples with a loss mask, optionally packed several per row with document ids so nothing leaks between them.

Both loaders read one global stream of items per step (batch_size * world of them) and each rank takes its
own contiguous slice: the union over ranks is exactly what one process with the global batch would see, and
the stream is a pure function of (seed, epoch, offset), which is all the state a resume needs.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

IGNORE = -100  # target the loss skips (cross-entropy ignore_index); defined only here


class _Stream:
    """An endless, seeded sequence of item indices: epoch e yields items_for_epoch(e); epochs wrap."""

    def __init__(self, items_for_epoch: Callable[[int], np.ndarray]):
        self._items_for_epoch = items_for_epoch
        self.epoch, self.offset = 0, 0
        self._cache: tuple[int, np.ndarray] | None = None

    def _items(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._items_for_epoch(epoch))
        return self._cache[1]

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next n (epoch, item) pairs."""
        out: list[tuple[int, int]] = []
        while len(out) < n:
            items = self._items(self.epoch)
            if len(items) == 0:
                raise ValueError("the data has no complete item (window or example) to draw")
            k = min(n - len(out), len(items) - self.offset)
            out.extend((self.epoch, int(i)) for i in items[self.offset:self.offset + k])
            self.offset += k
            if self.offset == len(items):
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


class _FileRows:
    """Reads windows of a file-backed np.memmap with pread instead of through the mapping.

    Touching a mapping makes the kernel map whole read-ahead chunks into the process (measured: 2,400 random
    windows of a 256 MB shard left all 256 MB resident), so resident memory would grow with the corpus. pread
    copies just the window; the rest stays in the shared page cache, which the kernel reclaims freely.
    """

    def __init__(self, a: np.memmap):
        self.dtype, self.offset = a.dtype, int(a.offset)
        self.fd = os.open(a.filename, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # random windows: read-ahead would only waste I/O
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    @staticmethod
    def usable(a: np.ndarray) -> bool:
        # Only a memmap made directly on a file (not a slice of one) knows its true byte offset.
        return isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and bool(a.filename)

    def read(self, start: int, n: int) -> np.ndarray:
        size = self.dtype.itemsize
        buf = os.pread(self.fd, n * size, self.offset + start * size)
        return np.frombuffer(buf, dtype=self.dtype)

    def __del__(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


def _doc_fields(x: torch.Tensor, bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids / position_ids for rows of raw token windows: a new document starts at every <|bos|>."""
    doc_ids = torch.cumsum((x == bos_id).long(), dim=1)
    T = x.shape[1]
    idx = torch.arange(T).expand_as(x)
    # position = index - index of this document's first token in the row (a running max of boundaries).
    starts = torch.where(torch.cat([torch.ones_like(x[:, :1], dtype=torch.bool),
                                    doc_ids[:, 1:] != doc_ids[:, :-1]], dim=1), idx, torch.zeros_like(idx))
    starts = torch.cummax(starts, dim=1).values
    return doc_ids, idx - starts


class TokenLoader:
    """Pretraining batches: next_batch() -> {x, y} LongTensors (B, T), plus doc_ids/position_ids if doc_mask."""

    def __init__(self, arrays: Sequence[np.ndarray], batch_size: int, seq_len: int, *, rank: int = 0,
                 world: int = 1, seed: int = 0, doc_mask: bool = False, bos_id: int = 0):
        self.arrays = [a for a in arrays if len(a) > seq_len]
        if not self.arrays:
            raise ValueError(f"no token array is longer than seq_len={seq_len}; give more data or a shorter context")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world, self.seed = rank, world, seed
        self.doc_mask, self.bos_id = doc_mask, bos_id
        self.vocab_size: int | None = None  # set by from_dir (from the shard headers)
        self.source = "the token arrays"
        self._lens = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self._files = [_FileRows(a) if _FileRows.usable(a) else None for a in self.arrays]
        self._stream = _Stream(self._windows_for_epoch)
        self._layout: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, shift, cumulative counts)

    @classmethod
    def from_dir(cls, shard_dir: str | Path, batch_size: int, seq_len: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, tok_hash: str | None = None, vocab_size: int | None = None,
                 doc_mask: bool = False) -> "TokenLoader":
        from .shards import open_shards  # the shard format belongs to data/shards.py

        shards = open_shards(shard_dir, tok_hash=tok_hash, vocab_size=vocab_size)
        loader = cls([s.tokens for s in shards], batch_size, seq_len, rank=rank, world=world, seed=seed,
                     doc_mask=doc_mask)
        # The shards' vocabulary, so the trainer can refuse a model too small for it before the first step.
        loader.vocab_size = max(s.header["vocab_size"] for s in shards)
        loader.source = str(shard_dir)
        return loader

    def _grid(self, epoch: int) -> tuple[int, np.ndarray]:
        """Each epoch shifts the window grid by a seeded offset so windows don't always start at k*T."""
        if self._layout is None or self._layout[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 1])
            shift = int(rng.integers(self.seq_len)) if epoch > 0 else 0
            counts = np.maximum((self._lens - 1 - shift) // self.seq_len, 0)
            self._layout = (epoch, shift, np.cumsum(counts))
        return self._layout[1], self._layout[2]

    def _windows_for_epoch(self, epoch: int) -> np.ndarray:
        _, cum = self._grid(epoch)
        return np.random.default_rng([self.seed, epoch]).permutation(int(cum[-1]))

    @property
    def epoch(self) -> int:
        return self._stream.epoch

    def next_batch(self) -> dict[str, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        picked = self._stream.take(B * self.world)[self.rank * B:(self.rank + 1) * B]
        rows = []
        for epoch, w in picked:
            shift, cum = self._grid(epoch)
            a = int(np.searchsorted(cum, w, side="right"))  # which array holds window w
            start = shift + (w - (int(cum[a - 1]) if a else 0)) * T
            f = self._files[a]
            row = f.read(start, T + 1) if f is not None else self.arrays[a][start:start + T + 1]
            rows.append(np.asarray(row, dtype=np.int64))
        buf = torch.from_numpy(np.stack(rows))
        batch = {"x": buf[:, :-1].contiguous(), "y": buf[:, 1:].contiguous()}
        if self.doc_mask:
            batch["doc_ids"], batch["position_ids"] = _doc_fields(batch["x"], self.bos_id)
        return batch

    def state_dict(self) -> dict:
        return {"kind": "token", "seed": self.seed, **self._stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._stream.load_state_dict(state)


def _sft_pair(ids: Sequence[int], mask: Sequence[int], seq_len: int) -> tuple[list[int], list[int]]:
    """One example -> (inputs, targets): targets are the next token, IGNORE where that token isn't trained on."""
    ids, mask = list(ids[:seq_len + 1]), list(mask[:seq_len + 1])
    x = ids[:-1]
    y = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    return x, y


class SFTLoader:
    """Fine-tuning batches from (ids, loss_mask) examples.

    pack=True: examples are laid greedily (next-fit, in the epoch's shuffled order) into rows of seq_len
    positions; doc_ids/position_ids keep attention and positions inside each example. pack=False: one
    example per row. Rows are padded with pad_id (targets IGNORE). Examples longer than seq_len+1 tokens
    are truncated.
    """

    def __init__(self, examples: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int, seq_len: int,
                 *, pad_id: int, rank: int = 0, world: int = 1, seed: int = 0, pack: bool = True):
        self.pairs = [_sft_pair(ids, m, seq_len) for ids, m in examples]
        self.pairs = [(x, y) for x, y in self.pairs if x and any(t != IGNORE for t in y)]
        if not self.pairs:
            raise ValueError("no fine-tuning example has a token to train on (check the loss masks)")
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.rank, self.world, self.seed, self.pack = rank, world, seed, pack
        self._rows: dict[int, list[list[int]]] = {}
        self._stream = _Stream(lambda e: np.arange(len(self._epoch_rows(e))))

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        """The epoch's rows, each a list of example indices (cheap: computed from lengths only)."""
        if epoch not in self._rows:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
            rows: list[list[int]] = []
            used = self.seq_len + 1
            for i in order.tolist():
                n = len(self.pairs[i][0])
                if self.pack and rows and used + n <= self.seq_len:
                    rows[-1].append(i)
                    used += n
                else:
                    rows.append([i])
                    used = n
            self._rows[epoch] = rows
            for old in [k for k in self._rows if k < epoch - 1]:  # a batch spans at most two epochs
                del self._rows[old]
        return self._rows[epoch]

    def next_batch(self) -> dict[str, torch.Tensor]:
        B = self.batch_size
        picked = self._stream.take(B * self.world)[self.rank * B:(self.rank + 1) * B]
        rows = [[self.pairs[i] for i in self._epoch_rows(e)[r]] for e, r in picked]
        return collate_rows(rows, self.seq_len, self.pad_id, with_docs=self.pack)

    def state_dict(self) -> dict:
        return {"kind": "sft", "seed": self.seed, **self._stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._stream.load_state_dict(state)


def collate_rows(rows: list[list[tuple[list[int], list[int]]]], seq_len: int, pad_id: int,
                 with_docs: bool) -> dict[str, torch.Tensor]:
    """Rows of (inputs, targets) segments -> padded tensors; doc_ids/position_ids restart per segment."""
    B = len(rows)
    x = torch.full((B, seq_len), pad_id, dtype=torch.long)
    y = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    doc = torch.zeros((B, seq_len), dtype=torch.long)
    pos = torch.zeros((B, seq_len), dtype=torch.long)
    for b, segs in enumerate(rows):
        t = 0
        for d, (sx, sy) in enumerate(segs):
            n = len(sx)
            x[b, t:t + n] = torch.tensor(sx)
            y[b, t:t + n] = torch.tensor(sy)
            doc[b, t:t + n] = d
            pos[b, t:t + n] = torch.arange(n)
            t += n
        # Padding is its own document so no real token attends to it.
        doc[b, t:] = len(segs)
        pos[b, t:] = torch.arange(seq_len - t)
    out = {"x": x, "y": y}
    if with_docs:
        out["doc_ids"], out["position_ids"] = doc, pos
    return out


def iter_eval_batches(arrays: Sequence[np.ndarray], batch_size: int, seq_len: int,
                      max_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Non-overlapping windows in order over every array (the whole split when max_batches=0)."""
    rows: list[np.ndarray] = []
    done = 0
    for a in arrays:
        for start in range(0, len(a) - seq_len, seq_len):
            rows.append(np.asarray(a[start:start + seq_len + 1], dtype=np.int64))
            if len(rows) == batch_size:
                buf = torch.from_numpy(np.stack(rows))
                yield {"x": buf[:, :-1].contiguous(), "y": buf[:, 1:].contiguous()}
                rows, done = [], done + 1
                if max_batches and done >= max_batches:
                    return
    if rows:
        buf = torch.from_numpy(np.stack(rows))
        yield {"x": buf[:, :-1].contiguous(), "y": buf[:, 1:].contiguous()}


def n_eval_batches(arrays: Sequence[np.ndarray], batch_size: int, seq_len: int, max_batches: int = 0) -> int:
    """How many batches iter_eval_batches yields (for a progress bar's total)."""
    windows = sum(-(-(len(a) - seq_len) // seq_len) for a in arrays if len(a) > seq_len)
    n = -(-windows // batch_size)
    return min(n, max_batches) if max_batches else n


def iter_sft_eval_batches(examples: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int,
                          seq_len: int, pad_id: int, max_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """One example per row, in order, padded to the batch's longest (not seq_len: a short chat scored in a 2,048
    context would pay for 2,048 positions; right padding after causal attention changes no score); targets
    masked like training. With max_batches, the examples are spread evenly over the list (a prepared file lists
    its sources one after another)."""
    pairs = [_sft_pair(ids, m, seq_len) for ids, m in examples]
    pairs = [p for p in pairs if p[0]]
    if max_batches and len(pairs) > max_batches * batch_size:
        n = max_batches * batch_size
        pairs = [pairs[i * len(pairs) // n] for i in range(n)]
    for k, i in enumerate(range(0, len(pairs), batch_size)):
        if max_batches and k >= max_batches:
            return
        rows = pairs[i:i + batch_size]
        yield collate_rows([[p] for p in rows], max(len(p[0]) for p in rows), pad_id, with_docs=False)


eval_batches = iter_eval_batches  # short alias
