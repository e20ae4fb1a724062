"""Engine: KV-cache equivalence, batching, stopping, UTF-8-safe streaming, chat history, terminal chat."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from chatforge.config import ModelConfig, TokenizerConfig
from chatforge.engine import Engine, sample_next
from chatforge.model import GPT
from chatforge.tokenizer import IncrementalDecoder, Tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3,
          "Hello world, hello there! How are you today? I am fine, thanks.",
          "Once upon a time there was a little model that wanted to talk."] * 4

pytestmark = pytest.mark.usefixtures("one_thread")



def make_tok() -> Tokenizer:
    # ASCII-only training text: multi-byte characters stay split into several byte tokens.
    return Tokenizer.train(CORPUS, TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1))


def make_model(tok: Tokenizer, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    args = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=128, init_std=0.2) | kw
    return GPT(ModelConfig(vocab_size=tok.vocab_size, **args)).eval()


def memorize(model: GPT, seqs: list[list[int]], steps: int = 150) -> GPT:
    """Overfit the model on a few sequences so its greedy output is known."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for s in seqs:
            x = torch.tensor([s])
            logits = model(x[:, :-1])
            loss = loss + F.cross_entropy(logits[0], x[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tok()


@pytest.fixture(scope="module")
def engine(tok) -> Engine:
    return Engine(make_model(tok), tok)


def test_greedy_same_with_and_without_cache(engine, tok):
    prompt = [tok.bos_id] + tok.encode("Hello world")
    a = engine.generate(prompt, max_new_tokens=30, temperature=0, use_cache=True)
    b = engine.generate(prompt, max_new_tokens=30, temperature=0, use_cache=False)
    assert len(a[0]) == 30
    assert a == b


def test_batch_rows_match_single_runs(engine, tok):
    prompts = [[tok.bos_id] + tok.encode(t) for t in ["Hi", "Once upon a time there was", "The quick brown fox"]]
    batched = engine.generate(prompts, max_new_tokens=20, temperature=0)
    single = [engine.generate(p, max_new_tokens=20, temperature=0)[0] for p in prompts]
    assert batched == single
    nocache = engine.generate(prompts, max_new_tokens=20, temperature=0, use_cache=False)
    assert nocache == single


def test_sampling_seeded_and_varied(engine, tok):
    prompt = [tok.bos_id]
    a = engine.generate(prompt, max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=1)
    b = engine.generate(prompt, max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=1)
    c = engine.generate(prompt, max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=2)
    assert a == b and a != c
    # top_k=1 is greedy whatever the temperature.
    g = engine.generate(prompt, max_new_tokens=20, temperature=0)
    assert engine.generate(prompt, max_new_tokens=20, temperature=1.5, top_k=1, seed=3) == g


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (1.0, 3, 1.0), (0.5, 0, 0.7), (2.0, 4, 0.8)])
def test_sample_next_draws_from_the_filtered_distribution(temperature, top_k, top_p):
    logits = torch.tensor([[2.0, -1.0, 1.0, 0.5, 3.0, -2.0]])
    # Expected: softmax(logits / T), keep the top k, then the smallest best-first set reaching top_p, renormalise.
    p = (logits[0] / temperature).softmax(-1)
    order = p.argsort(descending=True).tolist()
    keep = order[:top_k] if top_k else order
    q = p[keep] / p[keep].sum()
    mass_before = q.cumsum(0) - q
    keep = [i for i, m in zip(keep, mass_before.tolist()) if m < top_p]
    want = torch.zeros(6)
    want[keep] = p[keep] / p[keep].sum()
    g = torch.Generator().manual_seed(0)
    n = 40_000
    draws = sample_next(logits.expand(n, -1), None, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=1.0, generator=g)
    got = torch.bincount(draws, minlength=6).float() / n
    assert set(draws.unique().tolist()) == set(keep)
    assert torch.allclose(got, want, atol=0.01), (got, want)


def test_repetition_penalty_changes_greedy(engine, tok):
    prompt = [tok.bos_id] + tok.encode("hello hello hello")
    plain = engine.generate(prompt, max_new_tokens=40, temperature=0)[0]
    pen = engine.generate(prompt, max_new_tokens=40, temperature=0, repetition_penalty=5.0)[0]
    assert pen != plain
    assert len(set(pen)) >= len(set(plain))


def test_stop_ids_and_strings(engine, tok):
    prompt = [tok.bos_id] + tok.encode("Hello")
    full = engine.generate(prompt, max_new_tokens=20, temperature=0)[0]
    k = next(i for i in range(2, 20) if full[i] not in full[:i])  # first fresh token from the 3rd on
    assert engine.generate(prompt, max_new_tokens=20, temperature=0, stop_ids=[full[k]])[0] == full[:k + 1]
    # Stop strings: streaming stops right before the string and never shows any of it.
    ref = "".join(engine.stream(prompt, max_new_tokens=20, temperature=0))
    assert len(ref) > 10
    # A plain-ASCII stop string from the middle (random tokens also make invalid UTF-8, shown as U+FFFD).
    i = next(i for i in range(len(ref) // 3, len(ref) - 1) if ref[i:i + 2].isascii() and ref[i:i + 2].isprintable())
    stop = ref[i:i + 2]
    streamed = "".join(engine.stream(prompt, max_new_tokens=20, temperature=0, stop_strings=["zzzz", stop]))
    assert streamed == ref[:ref.find(stop)]
    # generate() ends with the token that completes the stop string.
    ids = engine.generate(prompt, max_new_tokens=20, temperature=0, stop_strings=[stop])[0]
    assert ids == full[:len(ids)] and stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])


def test_chat_stops_at_end_of_turn_and_streams_utf8():
    tok = make_tok()
    answer = "Grüße aus Köln 🙂 — 日本語!"
    assert any(len(tok.token_bytes()[i]) and tok.token_bytes()[i].decode("utf-8", "replace") == "\ufffd"
               for i in tok.encode(answer)), "test needs tokens that hold partial UTF-8 characters"
    msgs = [{"role": "user", "content": "Say hi"}]
    ids, _ = tok.render_chat(msgs + [{"role": "assistant", "content": answer}])
    model = memorize(make_model(tok, seed=1), [ids])
    engine = Engine(model, tok)
    chunks = list(engine.chat_stream(msgs, max_new_tokens=60, temperature=0))
    assert "".join(chunks) == answer  # stopped at <|end|>: nothing after the answer
    assert all("\ufffd" not in c for c in chunks)
    # Naive per-token decoding of the same ids would show replacement characters: the test has teeth.
    assert any("\ufffd" in tok.decode([i]) for i in tok.encode(answer))
    stream = engine.chat_stream(msgs, max_new_tokens=60, temperature=0)
    "".join(stream)
    assert stream.finish_reason == "stop" and stream.n_tokens == len(tok.encode(answer))
    assert engine.chat(msgs, temperature=0) == answer
    # Without the end-of-turn stop the model keeps going past the answer.
    p, _ = tok.render_chat(msgs, add_generation_prompt=True)
    more = engine.generate(p, max_new_tokens=len(tok.encode(answer)) + 3, temperature=0)[0]
    assert tok.end_id in more


def test_history_is_trimmed_to_fit_context(engine, tok):
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(30):
        msgs += [{"role": "user", "content": f"question number {i} about the quick brown fox"},
                 {"role": "assistant", "content": "the lazy dog"}]
    msgs.append({"role": "user", "content": "last one"})
    fitted = engine.fit_messages(msgs, max_new_tokens=20)
    assert fitted[0] == msgs[0] and fitted[-1] == msgs[-1] and len(fitted) < len(msgs)
    assert len(tok.render_chat(fitted, add_generation_prompt=True)[0]) + 20 <= engine.seq_len
    # The reply is the greedy continuation of exactly the fitted conversation.
    ids, _ = tok.render_chat(fitted, add_generation_prompt=True)
    want = "".join(engine.stream(ids, max_new_tokens=20, temperature=0, stop_ids=tok.stop_ids))
    assert want and engine.chat(msgs, max_new_tokens=20, temperature=0) == want


def test_incremental_decoder_roundtrip(tok):
    text = "naïve café 🙂 日本"
    dec = IncrementalDecoder(tok)
    parts = [dec.push(i) for i in tok.encode(text)]
    assert "".join(parts) + dec.flush() == text and all("\ufffd" not in p for p in parts)


def test_run_chat_commands(engine):
    from chatforge.chat_cli import run_chat

    inp = io.StringIO("hello\n/system You are a pirate.\nhi again\n/reset\n\nhow are you\n/quit\nnever read\n")
    out = io.StringIO()
    history = run_chat(engine, max_new_tokens=5, temperature=0, input_stream=inp, output_stream=out)
    # After /reset only the last exchange remains, with the pirate system prompt kept.
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[0]["content"] == "You are a pirate." and history[1]["content"] == "how are you"
    # Each reply is the engine's greedy reply to the conversation so far (system prompt and history included).
    pirate = {"role": "system", "content": "You are a pirate."}
    r1 = engine.chat([{"role": "user", "content": "hello"}], max_new_tokens=5, temperature=0)
    r2 = engine.chat([pirate, {"role": "user", "content": "hello"}, {"role": "assistant", "content": r1},
                      {"role": "user", "content": "hi again"}], max_new_tokens=5, temperature=0)
    r3 = engine.chat(history[:2], max_new_tokens=5, temperature=0)
    assert history[2]["content"] == r3
    assert out.getvalue() == f"{r1}\n[system prompt set]\n{r2}\n[history cleared]\n{r3}\n"


def test_run_chat_piped_subprocess(tmp_path, tok):
    # A real process reading piped stdin, as `echo ... | chatforge chat` would.
    tok.save(tmp_path / "tok")
    torch.save(make_model(tok).state_dict(), tmp_path / "model.pt")
    script = textwrap.dedent(f"""
        import torch
        from chatforge.config import ModelConfig
        from chatforge.engine import Engine
        from chatforge.model import GPT
        from chatforge.tokenizer import Tokenizer
        from chatforge.chat_cli import run_chat
        tok = Tokenizer.load({str(tmp_path / 'tok')!r})
        cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=128, vocab_size=tok.vocab_size)
        m = GPT(cfg); m.load_state_dict(torch.load({str(tmp_path / 'model.pt')!r}))
        h = run_chat(Engine(m, tok), max_new_tokens=4, temperature=0)
        import json
        print("HISTORY", json.dumps(h))
    """)
    r = subprocess.run([sys.executable, "-c", script], input="one\ntwo\n", capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    # Two user turns, two replies (the same model's greedy replies here); EOF ends the chat cleanly.
    engine = Engine(make_model(tok), tok)
    one, two = {"role": "user", "content": "one"}, {"role": "user", "content": "two"}
    r1 = engine.chat([one], max_new_tokens=4, temperature=0)
    r2 = engine.chat([one, {"role": "assistant", "content": r1}, two], max_new_tokens=4, temperature=0)
    history = [one, {"role": "assistant", "content": r1}, two, {"role": "assistant", "content": r2}]
    assert r.stdout == f"{r1}\n{r2}\nHISTORY {json.dumps(history)}\n", r.stdout


KINDS = [dict(qk_norm=True), dict(qk_norm=False, tie_embeddings=False, n_kv_head=4)]


@pytest.mark.parametrize("kw", KINDS)
def test_cached_greedy_equals_uncached(tok, kw):
    # Cached: prefill + decode_step (one row on the CPU: cpu_decode.decode_one); uncached: the whole sequence.
    model = make_model(tok, seed=3, **kw)
    eng = Engine(model, tok)
    prompts = [[tok.bos_id] + tok.encode("Once upon"), [tok.bos_id]]
    assert eng.generate(prompts, 25, temperature=0) == eng.generate(prompts, 25, temperature=0, use_cache=False)
    for p in prompts:
        assert eng.generate(p, 25, temperature=0) == eng.generate(p, 25, temperature=0, use_cache=False)


@pytest.mark.parametrize("kw", KINDS)
def test_cached_decode_logits_equal_full_forward_at_every_position(tok, kw):
    """Prefill, then one token at a time through the KV cache: the logits of every step equal the full
    forward's at that position. A key written to or read from the wrong column, or a wrong position, fails
    this: for a left-padded batch, for one row (decode_one, and GPT.forward), and for rows of different
    lengths sharing a cache (a column per row, as the batcher decodes)."""
    model = make_model(tok, seed=3, **kw)
    eng = Engine(model, tok)
    rows = [[tok.bos_id] + tok.encode(t) for t in ["Once upon a time there was", "Hi", "The quick brown fox"]]
    lens = [len(r) for r in rows]
    L = max(lens)
    pad = torch.tensor([L - n for n in lens]).unsqueeze(1)
    ids = torch.tensor([[tok.pad_id] * (L - len(r)) + r for r in rows])
    cols = torch.arange(L).unsqueeze(0)
    mask, pos = cols >= pad, (cols - pad).clamp(min=0)
    alone = [model(torch.tensor([r]))[0].detach() for r in rows]

    def close(a, b):
        return torch.allclose(a, b, atol=1e-5, rtol=1e-4)

    with torch.inference_mode():
        full = model(ids, position_ids=pos, mask=mask)
        assert all(close(full[b, L - n:], alone[b]) for b, n in enumerate(lens))  # padding changes nothing
        start = L - min(lens) + 1  # every row has a real token in the prefill
        cache = eng.new_cache(len(rows), L)
        got = [eng.prefill(ids[:, :start], cache, positions=pos[:, :start], mask=mask)]
        for t in range(start, L):
            got.append(eng.decode_step(ids[:, t:t + 1], cache, positions=pos[:, t:t + 1], mask=mask))
        assert cache.pos == L and close(torch.stack(got, 1), full[:, start - 1:])

        r = torch.tensor([rows[0]])
        for step in (eng.decode_step, lambda x, c: model(x, kv_cache=c)[:, -1]):
            cache = eng.new_cache(1, L)
            got = [eng.prefill(r[:, :1], cache)] + [step(r[:, t:t + 1], cache) for t in range(1, L)]
            assert close(torch.cat(got), alone[0])

        cache = eng.new_cache(len(rows), L)
        first = [eng.prefill(torch.tensor([r[:1 + b]]), cache.rows(b, b + 1)) for b, r in enumerate(rows)]
        assert all(close(f[0], alone[b][b]) for b, f in enumerate(first))
        n = [1 + b for b in range(len(rows))]  # tokens in the cache, per row
        while all(k < m for k, m in zip(n, lens)):
            x = torch.tensor([[r[k]] for r, k in zip(rows, n)])
            view = cache.rows(0, len(rows), pos=list(n))
            out = eng.decode_step(x, view)
            assert all(close(out[b], alone[b][k]) for b, k in enumerate(n))
            n = [k + 1 for k in n]
            assert view.pos == n


def test_stream_resumed_on_other_threads(engine, tok):
    # A web server's thread pool resumes the stream on different threads; grad mode is per thread.
    import threading

    prompt = [tok.bos_id] + tok.encode("Hello")
    want = list(engine.stream(prompt, max_new_tokens=12, temperature=0))
    stream = engine.stream(prompt, max_new_tokens=12, temperature=0)
    got: list = []
    while True:
        box: list = []
        th = threading.Thread(target=lambda: box.append(next(stream, None)))  # a new thread every step
        th.start()
        th.join()
        if box[0] is None:
            break
        got.append(box[0])
    assert got == want and torch.is_grad_enabled()


def test_fused_weights_follow_weight_updates(tok):
    # An engine kept across training steps must not decode with stale fused copies of the weights.
    model = make_model(tok, seed=5)
    eng = Engine(model, tok)
    prompt = [tok.bos_id] + tok.encode("Hello")
    before = eng.generate(prompt, 20, temperature=0)
    with torch.no_grad():
        for b in model.layers:  # an in-place update, as an optimizer step makes
            b.self_attn.q_proj.weight.mul_(-3.0)
            b.mlp.up_proj.weight.add_(0.3 * torch.randn_like(b.mlp.up_proj.weight))
    after = eng.generate(prompt, 20, temperature=0)
    assert after != before
    assert after == eng.generate(prompt, 20, temperature=0, use_cache=False)


def test_lora_wrapped_projections_decode_through_their_adapters(tok):
    pytest.importorskip("peft")
    from chatforge.lora import LoraSettings, add_lora

    model = make_model(tok, seed=6)
    prompt = [tok.bos_id] + tok.encode("Once upon")
    base = Engine(model, tok).generate(prompt, 20, temperature=0)
    add_lora(model, LoraSettings(rank=4))  # wraps the projections in place
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    eng = Engine(model.eval(), tok)
    cached = eng.generate(prompt, 20, temperature=0)
    assert cached != base  # the adapters are in effect...
    assert cached == eng.generate(prompt, 20, temperature=0, use_cache=False)  # ...on the cached path too
