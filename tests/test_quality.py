"""Quality rules, HTML to text, PII masking and language ID: each rule on text built to trip it, and in prepare."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from chatforge.config import DataConfig
from chatforge.data.clean import html_to_text
from chatforge.data.documents import iter_documents
from chatforge.data.prepare import prepare_corpus
from chatforge.data.quality import (QualityFilter, alpha_ratio, duplicate_line_fraction, mask_pii,
                                    mean_word_length, repeated_ngram_fraction, symbol_ratio)
from chatforge.data.stdlib_corpus import iter_stdlib_documents
from chatforge.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = ("the river ran past a quiet garden where seven orange lamps hung from old trees and children "
         "sang about bread paper music windows silver clouds and stone bridges").split()


def _prose(rng: random.Random, n: int = 120) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def test_statistics_on_known_text():
    assert mean_word_length("ab abcd".split()) == 3.0
    assert alpha_ratio("ab 12") == 0.5 and alpha_ratio("   ") == 0.0
    assert symbol_ratio("#a #b c ... d", 4) == 0.75
    assert duplicate_line_fraction("abc\nxyz\nabc\n\nabc") == pytest.approx(6 / 12)
    assert duplicate_line_fraction("one\ntwo\nthree") == 0.0
    words = "a b c d e a b c d e".split()
    assert repeated_ngram_fraction(words, 5) == 1.0
    assert repeated_ngram_fraction("a b c d e f g h i j".split(), 5) == 0.0
    assert repeated_ngram_fraction("x y z".split(), 5) == 0.0


def test_each_rule_names_its_reason():
    rng = random.Random(0)
    cfg = DataConfig(quality_filters=True)
    q = QualityFilter(cfg)
    good = _prose(rng)
    assert q.check(good) is None
    cases = {
        "too_few_words": "just a few words here",
        "mean_word_length": " ".join(["a", "an", "to", "of"] * 30),
        "alpha_ratio": " ".join(f"{rng.randint(0, 10**6)} item" for _ in range(60)),
        "symbol_ratio": " ".join(f"#{w}" if i % 3 == 0 else w for i, w in enumerate(good.split())),
        "duplicate_lines": "\n".join([good[:200]] + ["buy cheap pills now at the garden store"] * 20),
        "repeated_ngrams": " ".join(good.split()[:20]) + " " + " ".join(good.split()[:30] * 4),
    }
    for reason, text in cases.items():
        assert q.check(text) == reason, reason
    # Every threshold can be switched off on its own: 0 disables it.
    assert QualityFilter(DataConfig(quality_filters=True, min_alpha_ratio=0)).check(cases["alpha_ratio"]) is None
    assert QualityFilter(DataConfig()).check(cases["repeated_ngrams"]) is None  # master switch off


def test_prepare_reports_documents_and_bytes_per_reason(tmp_path):
    rng = random.Random(1)
    good = [_prose(rng) for _ in range(40)]
    spam = [" ".join(["buy now"] * 80) + f" {i}" for i in range(5)]  # repeated n-grams
    numbers = [" ".join(str(rng.randint(0, 10**9)) for _ in range(80)) for _ in range(3)]  # no letters
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in good + spam + numbers))
    off = prepare_corpus(DataConfig(inputs=[str(path)]), tmp_path / "off")
    assert off["documents_kept"] == 48  # off by default
    m = prepare_corpus(DataConfig(inputs=[str(path)], quality_filters=True), tmp_path / "on")
    assert m["documents_kept"] == 40
    dropped = m["dropped"]
    assert dropped["alpha_ratio"]["documents"] == 3
    assert dropped["alpha_ratio"]["bytes"] == sum(len(t.encode()) for t in numbers)
    # "buy now buy now ..." is short words: the mean-word-length rule fires before the n-gram rule.
    assert dropped["mean_word_length"]["documents"] + dropped.get("repeated_ngrams", {}).get("documents", 0) == 5


def test_default_config_keeps_the_python_stdlib():
    """The default corpus is stdlib source: defaults must not filter code (only exact copies go)."""
    from chatforge.data.prepare import DocumentProcessor

    proc = DocumentProcessor(DataConfig(), signatures=False)
    docs = list(iter_stdlib_documents())
    kept = sum(proc(d["text"]).text is not None for d in docs)
    assert len(docs) > 300 and kept >= 0.99 * len(docs)


def test_html_to_text_drops_script_and_style_and_keeps_blocks(tmp_path):
    page = ("<html><head><title>T</title><style>p {color: red}</style></head><body>"
            "<h1>Fish &amp; Chips</h1><p>Best   served <b>hot</b>,\nwith salt.</p>"
            "<script>alert('x')</script><ul><li>cod</li><li>haddock</li></ul>"
            "<pre>  keep\n    indent</pre><table><tr><td>a</td><td>b</td></tr></table></body></html>")
    assert html_to_text(page) == ("Fish & Chips\n\nBest served hot, with salt.\n\ncod\nhaddock\n\n"
                                  "  keep\n    indent\n\na b")
    (tmp_path / "page.html").write_text(page + "<p>" + "More words about the fish shop. " * 5 + "</p>")
    (tmp_path / "broken.htm").write_bytes(b"<div><p>Unclosed tags and a caf\xe9 " + b"text " * 20)
    m = prepare_corpus(DataConfig(inputs=[str(tmp_path)], min_chars=10), tmp_path / "o")
    texts = list(iter_documents(tmp_path / "o", "train")) + list(iter_documents(tmp_path / "o", "val"))
    assert len(texts) == 2 and m["read_errors"] == {"invalid_utf8": 1}
    assert all("alert" not in t and "color" not in t and "<" not in t for t in texts)


def test_mask_pii():
    text = ("Mail jane.doe+x@example.co.uk or root@localhost.org; server 192.168.0.1 and ::1 and "
            "2001:db8:85a3::8a2e:370:7334. Version 1.2.3 and time 12:30:45 stay; 999.1.1.1 is not an IP.")
    out, emails, ips = mask_pii(text)
    assert emails == 2 and ips == 2
    assert "<EMAIL> or <EMAIL>;" in out and "server <IP> and ::1 and <IP>." in out
    assert "1.2.3" in out and "12:30:45" in out and "999.1.1.1" in out


def test_mask_pii_in_prepare_is_off_by_default_and_counted(tmp_path):
    rng = random.Random(2)
    texts = [_prose(rng) + f" Contact me at user{i}@example.com from 10.0.0.{i}." for i in range(10)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    m = prepare_corpus(DataConfig(inputs=[str(path)]), tmp_path / "off")
    assert m["masked"] is None and "@example.com" in "".join(iter_documents(tmp_path / "off", "train"))
    m = prepare_corpus(DataConfig(inputs=[str(path)], mask_pii=True), tmp_path / "on")
    assert m["masked"] == {"emails": 10, "ips": 10}
    out = "".join(iter_documents(tmp_path / "on", "train")) + "".join(iter_documents(tmp_path / "on", "val"))
    assert "@example.com" not in out and out.count("<EMAIL>") == 10 and out.count("<IP>") == 10


def test_language_id_needs_a_package():
    have = any(importlib.util.find_spec(p) for p in ("langid", "langdetect"))
    if have:
        q = QualityFilter(DataConfig(languages=["en"]))
        assert q.check("The cat sat on the mat and looked at the garden for a long time.") is None
        assert q.check("Le chat est assis sur le tapis et regarde le jardin depuis longtemps.") == "language"
    else:
        with pytest.raises(UserError, match="langid"):
            QualityFilter(DataConfig(languages=["en"]))


def test_quality_filters_keep_real_english_prose(tmp_path):
    if not SHARED.is_dir():
        pytest.skip("shared data not present")
    path = SHARED / "tinystories" / "tinystoriesV2_gpt4_train_head10k_lines.txt"
    m = prepare_corpus(DataConfig(inputs=[str(path)], quality_filters=True), tmp_path / "o")
    dropped = sum(d["documents"] for r, d in m["dropped"].items() if r not in ("duplicate",))
    assert m["documents_kept"] > 1500 and dropped <= 0.05 * m["documents_read"]
