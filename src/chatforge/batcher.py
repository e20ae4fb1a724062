"""Continuous batching: concurrent generations share each decode step of one model.

One scheduler thread owns the model. A request joins between two steps: its prompt is prefilled alone
(Engine.prefill), straight into a free row of the shared KV cache, and from then on its next token is
computed in the same batched step (Engine.decode_step) as every other active row. A row leaves as soon as
it ends (stop, length, or its reader went away); the last row moves into its place, so the active rows are
always rows 0..n-1 and a lone request decodes as a batch of one. Rows keep their own lengths: each row's new
token goes to its own cache column, and attention sees no column past it. Every row samples with its own
settings and seed, and its text goes out through its own queue, with Engine.stream's stop handling
(StopText): a TextStream, or for asyncio callers (the server) an AsyncTextStream that no thread has to
wait on.

Decoding one token is bound by reading the weights and by per-operation overhead, not by arithmetic, so a step
for 8 rows costs far less than 8 steps for one row: that is the whole gain.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import torch

from .engine import Engine
from .sampling import StopText, TextStream, sample_next

_END = object()  # queue sentinel: the reply is complete


class AsyncTextStream(AsyncIterator[str]):
    """TextStream for asyncio code: `async for delta in stream`; then `finish_reason` and `n_tokens` are set."""

    def __init__(self) -> None:
        self._it: AsyncIterator[str] | None = None
        self.finish_reason: str | None = None
        self.n_tokens = 0

    async def __anext__(self) -> str:
        return await self._it.__anext__()

    async def aclose(self) -> None:
        await self._it.aclose()


class _Row:
    def __init__(self, ids: list[int], stop_ids: Sequence[int], max_new_tokens: int, temperature: float,
                 top_k: int, top_p: float, repetition_penalty: float, stop_strings: Sequence[str],
                 seed: int | None, text: StopText, put: Callable[[object], None]):
        self.ids = list(ids)  # prompt, then the sampled tokens (the repetition penalty's history)
        self.max_new = max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty)
        self.gen: torch.Generator | None = None
        self.seed = seed
        self.text = text
        self.put = put  # sends a text delta, an exception or _END to the reader
        self.new = 0  # tokens sampled so far
        self.cancelled = False
        self.finish_reason: str | None = None


class Batcher:
    """Submit prompts from any thread; each gets a TextStream that fills while the scheduler decodes."""

    def __init__(self, engine: Engine, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.engine = engine
        self.max_batch = max_batch
        self.cache = engine.new_cache(max_batch, engine.seq_len)
        self.rows: list[_Row] = []
        self.lens: list[int] = []  # tokens in the cache, per row
        self.waiting: queue.Queue[_Row] = queue.Queue()
        self.steps = 0  # decode steps run, and rows decoded in them: their ratio is the mean batch size
        self.row_steps = 0
        self._thread = threading.Thread(target=self._loop, name="chatforge-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], max_new_tokens: int = 128, temperature: float = 0.8, top_k: int = 50,
               top_p: float = 0.95, repetition_penalty: float = 1.0, stop_ids: Sequence[int] = (),
               stop_strings: Sequence[str] = (), seed: int | None = None) -> TextStream:
        """Like Engine.stream; the caller validates the prompt length (it must leave room in the context)."""
        out: queue.Queue = queue.Queue()
        row = self._new_row(prompt_ids, out.put, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                            stop_ids, stop_strings, seed)
        stream = TextStream(iter(()))

        def read() -> Iterator[str]:
            try:
                while (delta := _delta(row, stream, out.get())) is not None:
                    yield delta
            finally:
                row.cancelled = True  # the reader is gone (done, or closed early): free the row

        stream._it = read()
        self.waiting.put(row)
        return stream

    def submit_async(self, prompt_ids: list[int], max_new_tokens: int = 128, temperature: float = 0.8,
                     top_k: int = 50, top_p: float = 0.95, repetition_penalty: float = 1.0,
                     stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                     seed: int | None = None) -> AsyncTextStream:
        """submit for a caller on an asyncio event loop: no thread sits waiting for each reply's tokens (a server
        streaming to many clients would otherwise hop to a worker thread for every token of every reply)."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()

        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # the loop is closed (server shutting down): nobody reads this row
                row.cancelled = True

        row = self._new_row(prompt_ids, put, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                            stop_ids, stop_strings, seed)
        stream = AsyncTextStream()

        async def read() -> AsyncIterator[str]:
            try:
                while (delta := _delta(row, stream, await out.get())) is not None:
                    yield delta
            finally:
                row.cancelled = True

        stream._it = read()
        self.waiting.put(row)
        return stream

    def _new_row(self, prompt_ids: list[int], put: Callable[[object], None], max_new_tokens: int,
                 temperature: float, top_k: int, top_p: float, repetition_penalty: float,
                 stop_ids: Sequence[int], stop_strings: Sequence[str], seed: int | None) -> _Row:
        if not prompt_ids or len(prompt_ids) >= self.engine.seq_len:
            raise ValueError(f"a prompt needs 1 to {self.engine.seq_len - 1} tokens; got {len(prompt_ids)}")
        return _Row(prompt_ids, stop_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                    stop_strings, seed, StopText(self.engine.tok, stop_ids, stop_strings), put)

    # ---- scheduler -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                self._admit()
                if self.rows:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its rows, never the scheduler
                for r in self.rows:
                    r.put(e)
                self.rows, self.lens = [], []

    def _admit(self) -> None:
        while len(self.rows) < self.max_batch:
            try:  # with nothing to decode, sleep until a request comes
                row = self.waiting.get(block=not self.rows)
            except queue.Empty:
                return
            if row.cancelled:
                continue
            try:
                self._prefill(row)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                row.put(e)

    @torch.inference_mode()
    def _prefill(self, row: _Row) -> None:
        dev = self.engine.device
        if row.seed is not None:
            row.gen = torch.Generator(device=dev)
            row.gen.manual_seed(row.seed)
        n, L = len(self.rows), len(row.ids)
        logits = self.engine.prefill(torch.tensor([row.ids], device=dev), self.cache.rows(n, n + 1))
        self.rows.append(row)
        self.lens.append(L)
        self._emit(n, logits)
        self._drop_finished()

    @torch.inference_mode()
    def _step(self) -> None:
        n = len(self.rows)
        last = torch.tensor([[r.ids[-1]] for r in self.rows], device=self.engine.device)
        # Each row's new token goes to its own column, its length so far (also its position: no padding).
        logits = self.engine.decode_step(last, self.cache.rows(0, n, pos=list(self.lens)))
        self.steps += 1
        self.row_steps += n
        for i in range(n):
            self.lens[i] += 1
            try:
                self._emit(i, logits[i:i + 1])
            except Exception as e:  # noqa: BLE001 - sampling this row failed: its request fails, not the batch
                self.rows[i].finish_reason = "error"
                self.rows[i].put(e)
        self._drop_finished()

    def _emit(self, i: int, logits: torch.Tensor) -> None:
        """Sample row i's next token from its logits (1, V) and send its text; mark the row finished if it is."""
        r = self.rows[i]
        if r.cancelled:
            return
        hist = torch.tensor([r.ids], device=logits.device) if r.sampling["repetition_penalty"] != 1.0 else None
        t = int(sample_next(logits, hist, generator=r.gen, **r.sampling)[0])
        r.ids.append(t)
        r.new += 1
        delta = r.text.push(t)
        if delta:
            r.put(delta)
        if r.text.stopped:
            r.finish_reason = "stop"
        elif r.new >= r.max_new or self.lens[i] + 1 >= self.engine.seq_len:
            r.finish_reason = "length"  # the token just sampled would not fit in the context
        if r.finish_reason:
            tail = r.text.end()
            if tail:
                r.put(tail)
            r.put(_END)

    def _drop_finished(self) -> None:
        i = 0
        while i < len(self.rows):
            r = self.rows[i]
            if r.finish_reason is None and not r.cancelled:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:  # move the last row into the gap: the active rows stay 0..n-1
                self.cache.move_row(last, i, self.lens[last])
                self.rows[i], self.lens[i] = self.rows[last], self.lens[last]
            self.rows.pop()
            self.lens.pop()


def _delta(row: _Row, stream: TextStream | AsyncTextStream, item: object) -> str | None:
    """A reader's view of one item from its row: the text delta, or None at the end (then the stream's
    finish_reason is set); an exception from the scheduler is raised here."""
    if isinstance(item, BaseException):
        raise item
    stream.n_tokens = row.text.n_tokens
    if item is _END:
        stream.finish_reason = row.finish_reason
        return None
    return item
