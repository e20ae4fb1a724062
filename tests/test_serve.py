"""The OpenAI-compatible server, run for real (uvicorn on a free port) and driven by the official client."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import torch.nn.functional as F

from chatforge.config import ModelConfig, TokenizerConfig
from chatforge.engine import Engine
from chatforge.model import GPT
from chatforge.serve import create_app
from chatforge.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?"] * 5
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]

pytestmark = pytest.mark.usefixtures("one_thread")



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a background thread, stopped on exit."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def engine() -> Engine:
    tok = Tokenizer.train(CORPUS, TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1))
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=96, vocab_size=tok.vocab_size,
                      init_std=0.2)
    return Engine(GPT(cfg), tok)


@pytest.fixture(scope="module")
def server(engine):
    with Server(create_app(engine, "tiny-test")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def expected(engine: Engine, msgs: list[dict], n: int) -> str:
    return expected_stream(engine, msgs, n)[0]


def expected_stream(engine: Engine, msgs: list[dict], n: int) -> tuple[str, str, int]:
    """The engine's own greedy reply: (text, finish_reason, completion tokens)."""
    ids, _ = engine.tok.render_chat(msgs, add_generation_prompt=True)
    stream = engine.stream(ids, max_new_tokens=n, temperature=0, stop_ids=(engine.tok.end_id, engine.tok.eos_id))
    return "".join(stream), stream.finish_reason, stream.n_tokens


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-test"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "tiny-test" in page.text and "getReader" in page.text
    assert client.models.retrieve("tiny-test").id == "tiny-test"  # GET /v1/models/{id}
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"


def test_chat_non_stream_and_stream(engine, client):
    r = client.chat.completions.create(model="tiny-test", messages=MSGS, max_tokens=12, temperature=0)
    want, finish, n_tokens = expected_stream(engine, MSGS, 12)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish and r.usage.completion_tokens == n_tokens
    assert r.usage.prompt_tokens == len(engine.tok.render_chat(MSGS, add_generation_prompt=True)[0])
    chunks = list(client.chat.completions.create(model="tiny-test", messages=MSGS, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions(engine, client):
    r = client.completions.create(model="tiny-test", prompt="The quick", max_tokens=8, temperature=0)
    ids = engine.complete_prompt("The quick")
    stream = engine.stream(ids, max_new_tokens=8, temperature=0, stop_ids=engine.tok.stop_ids)
    want = "".join(stream)
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == stream.finish_reason and r.usage.completion_tokens == stream.n_tokens
    streamed = client.completions.create(model="tiny-test", prompt="The quick", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def memorize(model: GPT, seqs: list[list[int]], steps: int = 150) -> GPT:
    """Overfit the model on a few sequences so its greedy continuation is known."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = sum(F.cross_entropy(model(torch.tensor([s[:-1]]))[0], torch.tensor(s[1:])) for s in seqs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_completions_stop_at_the_tokenizers_stop_ids(engine):
    """/v1/completions ends a reply at end-of-turn or end-of-sequence (tok.stop_ids), with finish_reason "stop",
    though the model's own greedy continuation runs on past that token."""
    tok = engine.tok
    cases = {"The quick": (" brown fox", tok.end_id, " jumps over the lazy dog."),
             "Hello world": (", how are", tok.eos_id, " you today? Hello world")}
    seqs = {p: (engine.complete_prompt(p), tok.encode(reply), stop, tok.encode(tail))
            for p, (reply, stop, tail) in cases.items()}
    torch.manual_seed(1)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=96, vocab_size=tok.vocab_size)
    model = memorize(GPT(cfg), [p + r + [s] + t for p, r, s, t in seqs.values()])
    stopper = Engine(model, tok)
    with Server(create_app(stopper, "stopper")) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        for prompt, (p, reply, stop, tail) in seqs.items():
            # Without a stop the model goes on past the stop id: a server that ignored it would not stop there.
            assert stopper.generate(p, len(reply) + 1 + len(tail), temperature=0)[0] == reply + [stop] + tail
            r = client.completions.create(model="stopper", prompt=prompt, max_tokens=40, temperature=0)
            assert r.choices[0].text == cases[prompt][0], (prompt, r.choices[0].text)
            assert r.choices[0].finish_reason == "stop"
            assert r.usage.completion_tokens == len(reply) and r.usage.prompt_tokens == len(p)
            chunks = list(client.completions.create(model="stopper", prompt=prompt, max_tokens=40, temperature=0,
                                                    stream=True))
            assert "".join(c.choices[0].text for c in chunks) == cases[prompt][0]
            assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"


def test_sse_wire_format(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions",
                      json={"model": "x", "messages": MSGS, "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b'["a list"]', None),
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({"model": "x"}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "messages[0].content"),
    (json.dumps({"messages": MSGS, "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"messages": MSGS, "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "fox " * 200}]}).encode(), "messages"),
    # Found by outside testing: each of these gave 500 (or 200) before.
    (b"[" * 100_000 + b"]" * 100_000, None),  # nested too deep for the JSON parser
    (json.dumps({"messages": [{"role": ["user"], "content": "hi"}]}).encode(), "messages[0].role"),
    (json.dumps({"messages": [{"role": {"a": 1}, "content": "hi"}]}).encode(), "messages[0].role"),
    (json.dumps({"messages": MSGS, "seed": 2 ** 70}).encode(), "seed"),
    (json.dumps({"messages": MSGS, "stream": True, "stream_options": "yes"}).encode(), "stream_options"),
    (b'{"messages": ' + json.dumps(MSGS).encode() + b', "temperature": NaN}', "temperature"),
    (b'{"messages": ' + json.dumps(MSGS).encode() + b', "repetition_penalty": NaN}', "repetition_penalty"),
    (b'{"messages": ' + json.dumps(MSGS).encode() + b', "top_p": NaN}', "top_p"),
    (b'{"messages": ' + json.dumps(MSGS).encode() + b', "temperature": Infinity}', "temperature"),
])
def test_bad_requests_get_openai_errors(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    # The server keeps serving after every bad request.
    ok = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2})
    assert ok.status_code == 200


def test_context_error_code_and_unknown_route(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "fox " * 200}])
    assert e.value.code == "context_length_exceeded"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_concurrent_requests(server):
    def one(i: int) -> int:
        body = {"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 6, "stream": i % 2 == 0}
        return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(one, range(12))) == [200] * 12


def test_api_key(engine):
    with Server(create_app(engine, "locked", api_key="s3cret")) as s:
        assert httpx.get(s.url + "/health").status_code == 200  # health stays open for probes
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        r = good.chat.completions.create(model="locked", messages=MSGS, max_tokens=3, temperature=0)
        assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected(engine, MSGS, 3)
        # Every endpoint that generates refuses a missing, wrong, longer or shorter key.
        for path, body in (("/v1/chat/completions", {"messages": MSGS, "max_tokens": 2}),
                           ("/v1/completions", {"prompt": "Hello", "max_tokens": 2})):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret2"},
                            {"Authorization": "Bearer s3cre"}, {"Authorization": "s3cret"}):
                r = httpx.post(s.url + path, json=body, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
            r = httpx.post(s.url + path, json=body, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200, r.text


@pytest.mark.parametrize("extra", [{}, {"max_tokens": 10_000}, {"max_completion_tokens": 90}])
def test_max_tokens_absent_or_past_the_context_runs_to_its_end(server, engine, extra):
    """As llama.cpp's server: no 400 for a max_tokens the context cannot hold; it ends with "length"."""
    body = {"messages": MSGS, "temperature": 0, "stop": ["\u2603"], **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    u, choice = r.json()["usage"], r.json()["choices"][0]
    total = u["prompt_tokens"] + u["completion_tokens"]
    assert total <= engine.seq_len
    assert (choice["finish_reason"] == "length") == (total == engine.seq_len)


def test_a_request_body_over_the_limit_is_413(engine):
    with Server(create_app(engine, "small", max_body_bytes=10_000)) as s:
        big = {"messages": [{"role": "user", "content": "fox " * 5_000}], "max_tokens": 2}
        r = httpx.post(s.url + "/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit holds for a streamed upload too
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(100):
                yield b"fox " * 100
            yield b'"}]}'
        r = httpx.post(s.url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        ok = httpx.post(s.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2})
        assert ok.status_code == 200
