"""Token shards: header round trip, determinism across workers, tokenizer-mismatch refusal, dtype choice."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chatforge.config import TokenizerConfig
from chatforge.data.shards import (HEADER_BYTES, MAGIC, open_shards, pack_header, read_header, token_dtype,
                                   write_shards)
from chatforge.errors import UserError
from chatforge.data.stdlib_corpus import stdlib_texts
from chatforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(stdlib_texts(200_000), TokenizerConfig(vocab_size=400))


@pytest.fixture(scope="module")
def docs() -> list[str]:
    # Real files plus many tiny documents, so shards hold several documents each.
    return stdlib_texts(200_000) + [f"doc {i}: caf\u00e9 \U0001f600 <|end|>" for i in range(300)]


def test_token_dtype_choice():
    assert token_dtype(512) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(200_000) == np.uint32


def test_header_roundtrip(tmp_path):
    raw = pack_header(70_000, "0123456789abcdef", 123, 4)
    assert len(raw) == HEADER_BYTES and raw.startswith(MAGIC)
    (tmp_path / "shard_00000.bin").write_bytes(raw)
    h = read_header(tmp_path / "shard_00000.bin")
    assert h == {"version": 1, "dtype": "uint32", "itemsize": 4, "vocab_size": 70_000, "tokens": 123, "docs": 4,
                 "tokenizer_hash": "0123456789abcdef"}


def test_shards_hold_bos_plus_each_document(tok, docs, tmp_path):
    stats = write_shards(tok, docs, tmp_path, shard_tokens=20_000)
    shards = open_shards(tmp_path, tok_hash=tok.hash, vocab_size=tok.vocab_size)
    assert stats["shards"] == len(shards) > 1
    assert stats["docs"] == len(docs) == sum(len(s.doc_starts) for s in shards)
    assert stats["tokens"] == sum(len(s.tokens) for s in shards)
    assert stats["bytes_in"] == sum(len(d.encode()) for d in docs)
    decoded = []
    for s in shards:
        assert s.tokens.dtype == np.uint16 and not s.tokens.flags.writeable
        assert s.header["tokenizer_hash"] == tok.hash and s.header["docs"] == len(s.doc_starts)
        assert s.doc_starts[0] == 0 and (s.tokens[s.doc_starts] == tok.bos_id).all()
        assert int((s.tokens == tok.bos_id).sum()) == len(s.doc_starts)  # bos only at document starts
        # A shard is never over the cap unless one document alone is.
        ends = list(s.doc_starts[1:]) + [len(s.tokens)]
        assert len(s.tokens) <= 20_000 or len(s.doc_starts) == 1
        for a, b in zip(s.doc_starts, ends):
            decoded.append(tok.decode(s.tokens[a + 1:b].tolist()))
    assert decoded == docs


def test_identical_bytes_whatever_the_workers(tok, docs, tmp_path):
    outs = {}
    for w in (1, 2, 0):
        write_shards(tok, docs, tmp_path / str(w), shard_tokens=30_000, workers=w)
        outs[w] = {p.name: p.read_bytes() for p in sorted((tmp_path / str(w)).iterdir())}
    assert outs[1] == outs[2] == outs[0]
    assert any(n.endswith(".idx.npy") for n in outs[1])


def test_rewrite_removes_stale_shards(tok, docs, tmp_path):
    write_shards(tok, docs, tmp_path, shard_tokens=10_000)
    many = len(open_shards(tmp_path))
    write_shards(tok, docs, tmp_path)  # default cap: one shard
    assert many > 1 and len(open_shards(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_00000.bin", "shard_00000.idx.npy"]


def test_mismatched_tokenizer_refused(tok, docs, tmp_path):
    write_shards(tok, docs[:5], tmp_path)
    with pytest.raises(UserError, match=f"encoded with tokenizer {tok.hash} \\(vocab 400\\).*encode --force"):
        open_shards(tmp_path, tok_hash="ffffffffffffffff", vocab_size=400)
    with pytest.raises(UserError, match="vocab 400"):
        open_shards(tmp_path, tok_hash=tok.hash, vocab_size=512)


def test_missing_or_empty_dir_refused(tmp_path):
    with pytest.raises(UserError, match="run `chatforge encode`"):
        open_shards(tmp_path / "absent")
    with pytest.raises(UserError, match="no token shards"):
        open_shards(tmp_path)


def test_damaged_shard_refused(tok, docs, tmp_path):
    write_shards(tok, docs[:3], tmp_path)
    p = tmp_path / "shard_00000.bin"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(UserError, match="damaged"):
        open_shards(tmp_path)
    p.write_bytes(b"NOTTOKEN" + b"\0" * 300)
    with pytest.raises(UserError, match="not a chatforge token shard"):
        open_shards(tmp_path)


def test_big_vocab_writes_uint32(tmp_path):
    # A real tokenizer with ids above 65535: a character-level vocab over 70k distinct CJK/other characters.
    text = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c <= 0xDFFF)
    big = Tokenizer.train([text], TokenizerConfig(kind="char"))
    assert big.vocab_size > 65535
    doc = text[-50:]
    write_shards(big, [doc], tmp_path)
    (s,) = open_shards(tmp_path, tok_hash=big.hash, vocab_size=big.vocab_size)
    assert s.tokens.dtype == np.uint32 and s.header["itemsize"] == 4
    assert s.tokens.max() > 65535 and big.decode(s.tokens[1:].tolist()) == doc


def test_real_corpus_if_present(tok, tmp_path):
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    if not data.is_file():
        pytest.skip("shared data not present")
    text = data.read_text(encoding="utf-8")[:200_000]
    paras = [p for p in text.split("\n\n") if p.strip()]
    stats = write_shards(tok, paras, tmp_path, workers=0)
    (s,) = open_shards(tmp_path, tok_hash=tok.hash)
    assert stats["docs"] == len(paras) and stats["mb_per_s"] > 0
    assert tok.decode(s.tokens.tolist()) == "".join(paras)


def test_shard_ids_equal_tokenizer_encode(tok, docs, tmp_path):
    # The fast encoder writes the shards; the HF tokenizer (Tokenizer.encode) is the reference.
    odd = ["", "a<|bos|>b", "x\ud800y", "  spaced  out  ", "Grüße 😀 日本語"]
    write_shards(tok, docs + odd, tmp_path, shard_tokens=25_000)
    shards = open_shards(tmp_path, tok_hash=tok.hash)
    got = []
    for s in shards:
        ends = list(s.doc_starts[1:]) + [len(s.tokens)]
        got += [s.tokens[a + 1:b].tolist() for a, b in zip(s.doc_starts, ends)]
    assert got == [tok.encode(d) for d in docs + odd]
    stats = write_shards(tok, odd, tmp_path / "odd")
    assert stats["bytes_in"] == sum(len(d.encode("utf-8", "replace")) for d in odd) + 2  # surrogate -> U+FFFD


def test_token_counts_match_the_shards(tok, docs, tmp_path):
    from chatforge.embeddings import token_counts
    write_shards(tok, docs, tmp_path, shard_tokens=20_000)
    flat = np.concatenate([s.tokens for s in open_shards(tmp_path)])
    counts = token_counts(tmp_path, tok.vocab_size, chunk=777)  # small chunks: the chunked path is exercised
    assert counts.dtype == np.int64 and counts.shape == (tok.vocab_size,)
    assert np.array_equal(counts, np.bincount(flat, minlength=tok.vocab_size))
    assert counts[tok.bos_id] == len(docs) and counts.sum() == len(flat)
    with pytest.raises(UserError, match="vocab 400"):
        token_counts(tmp_path, 512)
