"""Continuous batching: rows that join and leave mid-flight give the same text as running alone."""
from __future__ import annotations

import time

import pytest
import torch

from chatforge.batcher import Batcher
from chatforge.engine import Engine
from test_engine import make_model, make_tok

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return make_tok()


@pytest.fixture(scope="module")
def engine(tok):
    return Engine(make_model(tok, seed=3), tok)


def prompts(tok) -> list[list[int]]:
    texts = ["The quick", "Hello world, hello there! How", "Once", "I am fine", "a little model that", "dog"]
    return [[tok.bos_id] + tok.encode(t) for t in texts]


def run_concurrently(batcher: Batcher, jobs: list[dict], join_late: bool = False) -> list[tuple[str, str, int]]:
    """Submit every job (submit does not block), then read each reply. join_late: the first job has produced
    text before the others are submitted, so they join a batch that is already decoding."""
    streams = [batcher.submit(**jobs[0])]
    first = next(streams[0]) if join_late else ""
    streams += [batcher.submit(**j) for j in jobs[1:]]
    texts = ["".join(s) for s in streams]
    texts[0] = first + texts[0]
    return [(t, s.finish_reason, s.n_tokens) for t, s in zip(texts, streams)]


def wait_idle(b: Batcher, timeout: float = 30.0) -> None:
    """A stream ends when its last token is put; the loop drops the row just after: give it time under load."""
    deadline = time.monotonic() + timeout
    while b.rows and time.monotonic() < deadline:
        time.sleep(0.01)


def alone(engine: Engine, job: dict) -> tuple[str, str, int]:
    s = engine.stream(**job)
    return "".join(s), s.finish_reason, s.n_tokens


@pytest.mark.parametrize("join_late", [False, True])
def test_batched_greedy_equals_each_request_alone(engine, tok, join_late):
    jobs = [dict(prompt_ids=p, max_new_tokens=10 + 7 * i, temperature=0) for i, p in enumerate(prompts(tok))]
    jobs[2]["stop_strings"] = ["e"]  # ends early: its row leaves while the others go on
    b = Batcher(engine, max_batch=4)  # 6 requests, 4 rows: two wait for a free row
    got = run_concurrently(b, jobs, join_late)
    assert got == [alone(engine, j) for j in jobs]
    assert got[2][1] == "stop" and got[0][1] == "length" and got[0][2] == 10
    assert b.row_steps > 1.5 * b.steps  # rows really shared decode steps
    wait_idle(b)
    assert b.rows == [] and b.waiting.empty()


def test_seeded_sampling_is_per_request_and_repeatable(engine, tok):
    b = Batcher(engine, max_batch=8)
    job = dict(prompt_ids=prompts(tok)[0], max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    other = dict(job, seed=8)
    first = run_concurrently(b, [job, other, job])
    assert first[0] == first[2] != first[1]
    assert run_concurrently(b, [job])[0] == first[0]  # the same seed alone, in a batch of one


def test_a_row_stops_at_the_end_of_the_context(engine, tok):
    b = Batcher(engine, max_batch=2)
    p = prompts(tok)[1]
    room = engine.seq_len - len(p)
    text, reason, n = run_concurrently(b, [dict(prompt_ids=p, max_new_tokens=10_000, temperature=0)])[0]
    assert (reason, n) == ("length", room)
    assert (text, reason, n) == alone(engine, dict(prompt_ids=p, max_new_tokens=room, temperature=0))


def test_a_closed_stream_frees_its_row(engine, tok):
    b = Batcher(engine, max_batch=2)
    s = b.submit(prompts(tok)[0], max_new_tokens=100, temperature=0)
    next(s)
    s.close()  # the reader went away (a client disconnected)
    rest = b.submit(prompts(tok)[3], max_new_tokens=5, temperature=0)
    assert "".join(rest) == alone(engine, dict(prompt_ids=prompts(tok)[3], max_new_tokens=5, temperature=0))[0]
    deadline = time.time() + 30
    while b.rows and time.time() < deadline:
        time.sleep(0.01)
    assert b.rows == []


def test_async_streams_match_and_free_their_rows(engine, tok):
    # The server's path: replies read on an event loop (submit_async) equal Engine.stream's, and a reader that
    # stops early (aclose, as a disconnected client's response does) frees its row.
    import asyncio

    b = Batcher(engine, max_batch=4)
    jobs = [dict(prompt_ids=p, max_new_tokens=12, temperature=0) for p in prompts(tok)[:4]]

    async def main():
        async def read(job):
            s = b.submit_async(**job)
            return "".join([d async for d in s]), s.finish_reason, s.n_tokens

        got = await asyncio.gather(*(read(j) for j in jobs))
        s = b.submit_async(prompts(tok)[4], max_new_tokens=200, temperature=0)
        await s.__anext__()
        await s.aclose()
        for _ in range(3000):  # the loop keeps running: the row must go because its reader went
            if not b.rows:
                break
            await asyncio.sleep(0.01)
        return got, len(b.rows), b.row_steps

    got, rows_left, row_steps = asyncio.run(main())
    assert got == [alone(engine, j) for j in jobs]
    assert rows_left == 0
    # It stopped well before its 200 tokens (a row that ran on would count 4 * 12 + 200); how many steps it
    # took before the batcher saw the reader go depends on the machine's load, hence the slack.
    assert row_steps < 4 * 12 + 120


def test_lora_wrapped_model_batches_through_its_adapters(tok):
    pytest.importorskip("peft")
    from chatforge.lora import LoraSettings, add_lora

    model = make_model(tok, seed=4)
    add_lora(model, LoraSettings(rank=2))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a non-zero adapter: decoding must go through it
    eng = Engine(model.eval(), tok)
    b = Batcher(eng, max_batch=8)
    jobs = [dict(prompt_ids=p, max_new_tokens=12, temperature=0) for p in prompts(tok)[:3]]
    got = run_concurrently(b, jobs)
    assert got == [alone(eng, j) for j in jobs]
    assert got != [alone(Engine(make_model(tok, seed=4), tok), j) for j in jobs]  # the adapters are in effect
    assert b.row_steps > b.steps  # rows shared decode steps (GPT.forward, through the adapters)


def test_bad_prompt_is_refused(engine):
    b = Batcher(engine)
    with pytest.raises(ValueError, match="a prompt needs"):
        b.submit([], max_new_tokens=3)
    with pytest.raises(ValueError, match="a prompt needs"):
        b.submit([1] * engine.seq_len, max_new_tokens=3)


def test_a_row_that_fails_while_sampling_fails_alone(engine, tok, monkeypatch):
    """An exception while sampling one row mid-flight fails only that request; the others finish as alone."""
    import chatforge.batcher as batcher_mod
    real = batcher_mod.sample_next
    calls = {"n": 0}

    def flaky(logits, history, *, generator=None, **kw):
        if generator is not None and generator.initial_seed() == 666:
            calls["n"] += 1
            if calls["n"] == 3:  # the bad row's third token: it has joined the batch by then
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, history, generator=generator, **kw)

    monkeypatch.setattr(batcher_mod, "sample_next", flaky)
    jobs = [dict(prompt_ids=p, max_new_tokens=12, temperature=0) for p in prompts(tok)[:3]]
    b = Batcher(engine, max_batch=4)
    good = [b.submit(**j) for j in jobs]
    bad = b.submit(prompt_ids=prompts(tok)[3], max_new_tokens=12, temperature=0.8, seed=666)
    with pytest.raises(RuntimeError, match="nan"):
        "".join(bad)
    got = [("".join(s), s.finish_reason, s.n_tokens) for s in good]
    assert got == [alone(engine, j) for j in jobs]
    wait_idle(b)
    assert calls["n"] == 3 and b.rows == []
