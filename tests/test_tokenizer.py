"""Tokenizer: lossless round trips, special-token safety, chat masks, HF/transformers compatibility."""
from __future__ import annotations

import json

import numpy as np
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatforge.config import TokenizerConfig
from chatforge.errors import UserError
from chatforge.data.stdlib_corpus import stdlib_texts
from chatforge.chat_format import CHAT_TEMPLATE, SPECIAL_TOKENS
from chatforge.tokenizer import PROBE_TEXT, IncrementalDecoder, Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(stdlib_texts(), TokenizerConfig(kind="bpe", vocab_size=512, min_frequency=2))


@pytest.fixture(scope="module")
def char_tok() -> Tokenizer:
    return Tokenizer.train(stdlib_texts(100_000) + ["\t\r"], TokenizerConfig(kind="char"))


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


SAMPLES = [
    "def main():\n    return 42\n",
    "Hello, world! It's a test.   Spaces  and\ttabs\r\n",
    "naïve café — 日本語のテキスト 😀👍🏽 e\u0301",
    "",
    " leading space",
    "1234567890 numbers 3.14159",
]

# Text from a few hard corners of Unicode, mixed with plain ASCII.
hard_chars = st.one_of(
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji (4-byte UTF-8)
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK (3-byte)
    st.characters(min_codepoint=0x0300, max_codepoint=0x036F),  # combining marks
    st.characters(min_codepoint=0x00, max_codepoint=0x1F),  # control characters
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.sampled_from(["\u200d", "\ufeff", "\u00a0", "\u2028", "\U0010ffff"]),
)
hard_text = st.text(hard_chars, max_size=200)
special_soup = st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS + ["<|", "|>", "<|endoftext|>"]), hard_text),
                        max_size=8).map("".join)


# ---- training basics ------------------------------------------------------------------------

def test_bpe_vocab_and_special_ids(tok):
    assert tok.kind == "bpe"
    assert tok.vocab_size == 512
    assert [tok.bos_id, tok.eos_id, tok.pad_id, tok.system_id, tok.user_id, tok.assistant_id, tok.end_id] == list(range(7))
    assert [tok.id_to_token(i) for i in range(7)] == SPECIAL_TOKENS
    assert len(tok.hash) == 16 and int(tok.hash, 16) >= 0
    # BPE actually learned merges: common source text is much shorter than its byte count.
    text = stdlib_texts(1)[0]
    assert len(tok.encode(text)) < 0.6 * len(text.encode())


def test_training_is_deterministic(tok):
    again = Tokenizer.train(stdlib_texts(), TokenizerConfig(kind="bpe", vocab_size=512, min_frequency=2))
    assert again.hash == tok.hash


def test_vocab_too_small_is_a_user_error():
    with pytest.raises(UserError, match="at least 263"):
        Tokenizer.train(["abc"], TokenizerConfig(vocab_size=100))


def test_unknown_kind_is_a_user_error():
    with pytest.raises(UserError, match="'wordpiece'"):
        Tokenizer.train(["abc"], TokenizerConfig(kind="wordpiece"))


def test_max_train_bytes_limits_training_text():
    t = Tokenizer.train(["abcde", "fghij", "xyz"], TokenizerConfig(kind="char", max_train_bytes=7))
    assert t.vocab_size == 7 + 7  # specials + a..g
    with pytest.raises(UserError, match="'h'"):
        t.encode("h")


# ---- lossless round trips -------------------------------------------------------------------

@pytest.mark.parametrize("text", SAMPLES)
def test_roundtrip_samples(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_roundtrip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(hard_text)
def test_roundtrip_hard_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(7 <= i < tok.vocab_size for i in ids)


def test_roundtrip_long_string(tok):
    text = ("The quick brown fox 🦊 jumps over 13 lazy dogs.\n" * 2000) + "x" * 10_000 + " " * 5000
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(special_soup)
def test_special_looking_text_stays_text(tok, text):
    ids = tok.encode(text)
    assert not any(i < len(SPECIAL_TOKENS) for i in ids)
    assert tok.decode(ids) == text


def test_literal_end_token_is_not_end_id(tok):
    ids = tok.encode("<|end|>")
    assert tok.end_id not in ids and len(ids) > 1
    assert tok.decode(ids) == "<|end|>"
    for t in SPECIAL_TOKENS:
        assert not set(tok.encode(f"a {t} b")) & set(range(7))


def test_lone_surrogates_become_replacement_char(tok):
    # Not valid Unicode, so not UTF-8 encodable: replaced by U+FFFD instead of failing a corpus.
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
    assert tok.encode("a\udfffb") == tok.encode("a\ufffdb")
    batch = tok.encode_batch(["ok", "x\ud83d", "fine"])
    assert batch == [tok.encode("ok"), tok.encode("x\ufffd"), tok.encode("fine")]


def test_encode_rejects_non_str(tok):
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_encode_batch_matches_encode(tok):
    texts = SAMPLES + stdlib_texts(50_000)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_decode_skip_special(tok):
    ids = [tok.bos_id] + tok.encode("hi") + [tok.end_id]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == "<|bos|>hi<|end|>"


@settings(max_examples=100, deadline=None)
@given(hard_text)
def test_token_bytes_lengths_sum_to_utf8_length(tok, text):
    lengths = tok.token_bytes_lengths()
    assert int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_token_bytes_lengths_specials_zero(tok):
    lengths = tok.token_bytes_lengths()
    assert lengths.shape == (tok.vocab_size,)
    assert (lengths[:7] == 0).all() and (lengths[7:] >= 1).all()


# ---- streaming decode ------------------------------------------------------------------------

def test_incremental_decoder_holds_back_split_characters(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # a small vocab splits this 4-byte character: the case under test
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "😀"


@settings(max_examples=150, deadline=None)
@given(hard_text)
def test_incremental_decoder_never_emits_replacement(tok, text):
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in [tok.bos_id] + tok.encode(text) + [tok.end_id]]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text


def test_incremental_decoder_specials_when_asked(tok):
    dec = IncrementalDecoder(tok, skip_special=False)
    assert "".join(dec.push(i) for i in [tok.assistant_id, *tok.encode("ok"), tok.end_id]) == "<|assistant|>ok<|end|>"


# ---- chat rendering and loss masks ------------------------------------------------------------

def _expect(tok, parts):
    """parts: list of (ids, mask_value) -> flat ids and mask."""
    ids, mask = [], []
    for p, m in parts:
        ids += p
        mask += [m] * len(p)
    return ids, mask


def test_chat_single_turn_mask(tok):
    got = tok.render_chat([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there!"}])
    q, a = tok.encode("Hi?"), tok.encode("Hello there!")
    want = _expect(tok, [([tok.bos_id, tok.user_id], 0), (q, 0), ([tok.end_id], 0),
                         ([tok.assistant_id], 0), (a, 1), ([tok.end_id], 1)])
    assert got == want


def test_chat_multi_turn_with_system_mask(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6, of course."}]
    ids, mask = tok.render_chat(msgs)
    s, q1, a1, q2, a2 = (tok.encode(m["content"]) for m in msgs)
    want = _expect(tok, [([tok.bos_id, tok.system_id], 0), (s, 0), ([tok.end_id], 0),
                         ([tok.user_id], 0), (q1, 0), ([tok.end_id], 0),
                         ([tok.assistant_id], 0), (a1, 1), ([tok.end_id], 1),
                         ([tok.user_id], 0), (q2, 0), ([tok.end_id], 0),
                         ([tok.assistant_id], 0), (a2, 1), ([tok.end_id], 1)])
    assert (ids, mask) == want
    # Exactly the assistant turns' ends are learned: 2 of the 5 <|end|> tokens.
    assert sum(m for i, m in zip(ids, mask) if i == tok.end_id) == 2
    assert tok.decode(ids, skip_special=False) == tok.render_chat_text(msgs)


def test_chat_generation_prompt(tok):
    ids, mask = tok.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert ids == [tok.bos_id, tok.user_id, *tok.encode("Hi"), tok.end_id, tok.assistant_id]
    assert mask == [0] * len(ids)


def test_chat_content_with_special_text_stays_text(tok):
    ids, mask = tok.render_chat([{"role": "user", "content": "say <|end|><|assistant|>"},
                                 {"role": "assistant", "content": "<|end|>"}])
    assert ids.count(tok.end_id) == 2 and ids.count(tok.assistant_id) == 1
    assert sum(mask) == len(tok.encode("<|end|>")) + 1


@pytest.mark.parametrize("msgs, match", [
    ([{"role": "bot", "content": "x"}], "role 'bot'"),
    ([{"role": "user", "content": None}], "content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message may only come first"),
    (["hello"], "message 0"),
])
def test_chat_bad_messages(tok, msgs, match):
    with pytest.raises(UserError, match=match):
        tok.render_chat(msgs)


# ---- save / load / transformers -------------------------------------------------------------

def test_save_load_roundtrip(tok, saved):
    assert {p.name for p in saved.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "chatforge_tokenizer.json"}
    again = Tokenizer.load(saved)
    assert again.hash == tok.hash and again.kind == "bpe" and again.vocab_size == tok.vocab_size
    for t in SAMPLES:
        assert again.encode(t) == tok.encode(t)
    cfg = json.loads((saved / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE and "model_max_length" not in cfg


def test_load_missing_is_user_error(tmp_path):
    with pytest.raises(UserError, match="run `chatforge tokenizer` first"):
        Tokenizer.load(tmp_path / "nope")


def test_transformers_gives_identical_ids(tok, saved):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=str(saved / "tokenizer.json"))
    for t in SAMPLES + stdlib_texts(20_000)[:3]:
        assert hf(t, add_special_tokens=False)["input_ids"] == tok.encode(t)
        assert hf.decode(tok.encode(t)) == t


CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit 🍎"},
     {"role": "assistant", "content": " An apple.\n"}, {"role": "user", "content": "Another?"}],
]


@pytest.mark.parametrize("msgs", CHATS)
@pytest.mark.parametrize("gen", [False, True])
def test_transformers_chat_template_matches_render_chat(tok, saved, msgs, gen):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(saved))
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert text == tok.render_chat_text(msgs, add_generation_prompt=gen)
    ids, _ = tok.render_chat(msgs, add_generation_prompt=gen)
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids, skip_special=False) == text


# ---- character-level ------------------------------------------------------------------------

def test_char_tokenizer(char_tok, tmp_path):
    assert char_tok.kind == "char"
    vocab_chars = [char_tok.id_to_token(i) for i in range(7, char_tok.vocab_size)]
    assert vocab_chars == sorted(vocab_chars) and all(len(c) == 1 for c in vocab_chars)
    text = "def f(x):\n\treturn x  # <|end|>\r\n"
    ids = char_tok.encode(text)
    assert len(ids) == len(text) and char_tok.end_id not in ids
    assert char_tok.decode(ids) == text
    assert (char_tok.token_bytes_lengths()[7:] >= 1).all()
    with pytest.raises(UserError, match="U\\+1F600"):
        char_tok.encode("smile 😀")
    char_tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.kind == "char" and again.encode(text) == ids
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    plain = "def f(x):\n\treturn x  # done\r\n"  # (transformers turns literal "<|end|>" into the special)
    assert hf(plain, add_special_tokens=False)["input_ids"] == char_tok.encode(plain) and hf.decode(ids) == text
    msgs = CHATS[0]
    assert char_tok.decode(char_tok.render_chat(msgs)[0], skip_special=False) == char_tok.render_chat_text(msgs)


# ---- embedding tools ------------------------------------------------------------------------

def test_nearest_finds_planted_neighbour(tok):
    import torch
    from chatforge.embeddings import nearest
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(tok.vocab_size, 32, generator=g)
    (w,) = tok.encode(" def")
    (twin,) = tok.encode(" return")
    emb[twin] = 2 * emb[w]  # same direction: cosine 1
    emb[tok.end_id] = emb[w]  # specials are never an answer
    got = nearest(emb, tok, " def", k=5)
    assert len(got) == 5 and got[0][0] == " return" and got[0][1] == pytest.approx(1.0, abs=1e-5)
    assert all(a[1] >= b[1] for a, b in zip(got, got[1:])) and got[1][1] < 0.99
    assert "<|end|>" not in [t for t, _ in got] and " def" not in [t for t, _ in got]


def test_plot_projection_writes_png(tok, tmp_path):
    import numpy as np
    import torch
    from chatforge.embeddings import plot_projection
    emb = torch.randn(tok.vocab_size, 16)
    counts = np.arange(tok.vocab_size)[::-1].copy()
    out = plot_projection(emb, tok, tmp_path / "sub" / "emb.png", n=50, counts=counts)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    plot_projection(emb, tok, tmp_path / "emb2.png", n=40)
    from PIL import Image
    with Image.open(tmp_path / "emb2.png") as im:  # 12 x 12 in at 120 dpi, trimmed to its content
        assert im.format == "PNG" and min(im.size) > 1000, im.size
        rgb = np.asarray(im.convert("RGB")).astype(int)
    # The scatter's points (translucent blue): about 15-20 pixels each, 40 of them; labels and axes are black.
    points = int(((rgb[..., 2] - rgb[..., 0]) > 40).sum())
    assert points > 300, points


# ---- fast bulk encoder (tiktoken for BPE, lookup table for char) must give HF's ids ------------

MIXED = [
    "Grüße aus Köln! Ça va? naïve café, 日本語のテキストです。한국어 텍스트. Ελληνικά και русский текст.",
    "emoji 😀👍🏽👨‍👩‍👧 and flags 🇫🇷🇯🇵; maths ∑∫√ ½ ² ٣٤٥ १२३; accents e\u0301 a\u0308\u0323",
] * 40


@pytest.fixture(scope="module")
def uni_tok() -> Tokenizer:
    """A BPE vocabulary with many multi-byte merges (CJK, emoji, accents), where byte order subtleties live."""
    return Tokenizer.train(stdlib_texts(60_000) + MIXED, TokenizerConfig(kind="bpe", vocab_size=700))


def _hf_ids(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.hf.encode_batch([t.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
                                                 for t in texts], add_special_tokens=False)]


def test_fast_backends_are_in_use(tok, uni_tok, char_tok):
    pytest.importorskip("tiktoken")
    assert tok.fast_backend == "tiktoken" and uni_tok.fast_backend == "tiktoken" and tok.fast_note == ""
    assert char_tok.fast_backend == "lut"


@settings(max_examples=120, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=200), hard_text, special_soup), min_size=1, max_size=6))
def test_fast_path_equals_hf(tok, uni_tok, texts):
    for t in (tok, uni_tok):
        assert t.encode_batch(texts) == _hf_ids(t, texts) == [t.encode(x) for x in texts]


@pytest.mark.parametrize("text", [PROBE_TEXT,
                                  "a<|bos|>b", "<|bos|>", "x\ud800y \udc00", "\ud83d\ude00 pair", "", "   ", "\n\n",
                                  "It'S 'll 'ſ DON'T", "x" * 5000, " \u00a0\u3000\u2028 \t\r\n"])
def test_fast_path_edge_cases(tok, uni_tok, text):
    for t in (tok, uni_tok):
        ids, starts = t.encode_documents([text, text])
        assert starts.tolist() == [0, len(ids) // 2] and ids[0] == t.bos_id
        assert ids[1:len(ids) // 2].tolist() == t.encode(text)


def test_fast_path_every_unicode_class(uni_tok):
    # A stride through all of Unicode, each code point after a letter, a digit, a space and itself: the split
    # regex must classify it alike in tiktoken's engine and HF's (Oniguruma).
    cps = [chr(c) for c in range(0, 0x110000, 23) if not 0xD800 <= c <= 0xDFFF]
    docs = ["".join(f"a{c}b {c}1 {c}{c}'s\n" for c in cps[i:i + 400]) for i in range(0, len(cps), 400)]
    assert uni_tok.encode_batch(docs) == _hf_ids(uni_tok, docs)


def test_encode_documents_layout_and_threads(uni_tok):
    texts = MIXED[:10] + ["", "<|bos|> literal"] + stdlib_texts(30_000)
    one = uni_tok.encode_documents(texts, threads=1)
    many = uni_tok.encode_documents(texts, threads=3)
    assert np.array_equal(one[0], many[0]) and np.array_equal(one[1], many[1])
    ids, starts = one
    assert ids.dtype == np.uint32 and starts.dtype == np.int64 and len(starts) == len(texts)
    ends = list(starts[1:]) + [len(ids)]
    assert [ids[a + 1:b].tolist() for a, b in zip(starts, ends)] == [uni_tok.encode(t) for t in texts]


def test_verify_fast_falls_back_on_disagreement(tok):
    tiktoken = pytest.importorskip("tiktoken")
    t = Tokenizer(tok.hf, "bpe", json_text=tok.hf.to_str(pretty=True))
    assert t.fast_backend == "tiktoken"
    # A real tiktoken engine with the wrong split regex: it must be caught, and HF used from then on.
    ranks = {b: i for i, b in enumerate(t.token_bytes()) if i >= 7}
    t._fast = tiktoken.Encoding("wrong", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={"<|bos|>": 0})
    text = "two  spaces, it's 1234"
    with pytest.warns(RuntimeWarning, match="differ"):
        assert t.verify_fast([text]) is False
    assert t.fast_backend == "hf" and "differ" in t.fast_note
    assert t.encode_batch([text]) == [t.encode(text)]
    assert t.encode_documents([text])[0].tolist() == [0, *t.encode(text)]


def test_without_tiktoken_falls_back_to_hf(tok, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tiktoken", None)  # import tiktoken -> ImportError
    t = Tokenizer(tok.hf, "bpe", json_text=tok.hf.to_str(pretty=True))
    assert t.fast_backend == "hf" and "not installed" in t.fast_note
    texts = SAMPLES + ["x\ud800"]
    assert t.encode_batch(texts) == [tok.encode(x) for x in texts]


def test_saved_tokenizer_records_fast_backend(uni_tok, tmp_path):
    uni_tok.save(tmp_path)
    meta = json.loads((tmp_path / "chatforge_tokenizer.json").read_text())
    assert meta["fast_backend"] == uni_tok.fast_backend
    again = Tokenizer.load(tmp_path)
    assert again.encode_batch(MIXED[:2]) == uni_tok.encode_batch(MIXED[:2])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.sampled_from(sorted(set("".join(stdlib_texts(100_000))) | {"\t", "\r"}) + SPECIAL_TOKENS),
                         max_size=100).map("".join), min_size=1, max_size=5))
def test_char_lookup_table_equals_hf(char_tok, texts):
    assert char_tok.encode_batch(texts) == _hf_ids(char_tok, texts)


def test_char_lookup_table_rejects_unknown_character(char_tok):
    with pytest.raises(UserError, match="U\\+1F600"):
        char_tok.encode_batch(["fine", "smile 😀"])


# ---- compression ------------------------------------------------------------------------------

def test_compression_report_and_reference(tok, char_tok):
    from chatforge.tokenizer import compression_report
    from chatforge.tokenizer_train import reference_bytes_per_token
    texts = stdlib_texts(300_000)
    train, val = texts[1:], texts[:1]
    rep = compression_report(tok, val)
    n_bytes = len(val[0].encode())
    assert rep["docs"] == 1 and rep["bytes"] == n_bytes and rep["tokens"] == len(tok.encode(val[0]))
    assert rep["bytes_per_token"] == pytest.approx(n_bytes / rep["tokens"]) and rep["bytes_per_token"] > 1.5
    ref = reference_bytes_per_token(train, val, vocab_size=512, max_train_bytes=300_000)
    # Same data, same vocab size, the peer library's stock setup: a comparable figure, not a wild one.
    assert 1.5 < ref < 6 and 0.7 < rep["bytes_per_token"] / ref < 1.4
    capped = compression_report(tok, val, max_bytes=1000)
    assert capped["bytes"] == 1000
    ascii_text = "def f(x):\n    return x\n"
    assert compression_report(char_tok, [ascii_text])["bytes_per_token"] == 1.0


# ---- char-level end to end on tinyshakespeare ----------------------------------------------------

def test_char_tokenizer_tinyshakespeare(tmp_path):
    import torch
    from chatforge.data.shards import open_shards, write_shards
    from chatforge.embeddings import nearest, plot_projection, token_counts
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    if not data.is_file():
        pytest.skip("shared data not present")
    text = data.read_text(encoding="utf-8")
    tok = Tokenizer.train([text], TokenizerConfig(kind="char"))
    assert tok.vocab_size == 65 + len(SPECIAL_TOKENS) and tok.fast_backend == "lut"
    tok.save(tmp_path / "tok")
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.kind == "char" and tok.vocab_size == 72
    paras = [p for p in text.split("\n\n") if p.strip()]
    write_shards(tok, paras, tmp_path / "shards", shard_tokens=300_000)
    shards = open_shards(tmp_path / "shards", tok_hash=tok.hash, vocab_size=tok.vocab_size)
    assert len(shards) > 1 and all(s.tokens.dtype == np.uint16 for s in shards)
    flat = np.concatenate([s.tokens for s in shards])
    assert tok.decode(flat.tolist()) == "".join(paras) and len(flat) == len("".join(paras)) + len(paras)
    counts = token_counts(tmp_path / "shards", tok.vocab_size)
    assert counts[tok.bos_id] == len(paras) and counts[tok.encode("e")[0]] == "".join(paras).count("e")
    emb = torch.randn(tok.vocab_size, 16, generator=torch.Generator().manual_seed(0))
    (a,), (b,) = tok.encode("a"), tok.encode("A")
    emb[b] = emb[a] * 3
    got = nearest(emb, tok, "a", k=3)
    assert got[0] == ("A", pytest.approx(1.0, abs=1e-5)) and len(got) == 3
    out = plot_projection(emb, tok, tmp_path / "chars.png", n=100, counts=counts)
    assert out.read_bytes()[:4] == b"\x89PNG"
