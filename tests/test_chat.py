"""Chat examples for fine-tuning: rendering a JSONL file, truncation, dropping, stats."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from chatforge.config import TokenizerConfig
from chatforge.data.chat import render_examples
from chatforge.errors import UserError
from chatforge.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts, n = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.append(p.read_text(encoding="utf-8", errors="replace"))
        n += len(texts[-1])
        if n > 200_000:
            break
    return Tokenizer.train(texts, TokenizerConfig(vocab_size=400))


def write_jsonl(path: Path, convs: list[list[dict]]) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
    return path


def conv(q: str, a: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_render_examples_stats_and_masks(tok, tmp_path):
    convs = [conv("Hi", "Hello!"), conv("What is up?", "Not much.", system="Be nice.")]
    examples, stats = render_examples(tok, write_jsonl(tmp_path / "a.jsonl", convs), seq_len=512)
    assert [e for e in examples] == [tok.render_chat(c) for c in convs]
    assert stats == {"examples": 2, "truncated": 0, "dropped": 0,
                     "tokens": sum(len(i) for i, _ in examples),
                     "loss_tokens": sum(len(tok.encode(c[-1]["content"])) + 1 for c in convs)}


def test_too_long_cut_keeps_the_window(tok, tmp_path):
    long_answer = conv("q", "word " * 200)  # answer starts early: survives the cut
    long_question = conv("why " * 200, "because")  # answer after the cut: nothing left to learn
    short = conv("a", "b")
    examples, stats = render_examples(tok, write_jsonl(tmp_path / "b.jsonl", [long_answer, long_question, short]),
                                      seq_len=32, too_long="cut")
    assert stats["truncated"] == 2 and stats["dropped"] == 1 and stats["examples"] == 2
    (ids0, mask0), (ids1, _) = examples
    assert len(ids0) == 33 and len(mask0) == 33 and sum(mask0) > 0
    full_ids, full_mask = tok.render_chat(long_answer)
    assert (ids0, mask0) == (full_ids[:33], full_mask[:33])
    assert ids1 == tok.render_chat(short)[0]
    assert stats["tokens"] == 33 + len(ids1)


def test_too_long_turns_keeps_whole_turns_ending_in_end_of_turn(tok, tmp_path):
    two_turns = conv("q", "short answer") + [{"role": "user", "content": "more?"},
                                             {"role": "assistant", "content": "word " * 200}]
    long_answer = conv("q", "word " * 200)  # its only reply does not fit: dropped, not cut mid-reply
    short = conv("a", "b")
    examples, stats = render_examples(tok, write_jsonl(tmp_path / "t.jsonl", [two_turns, long_answer, short]),
                                      seq_len=32)
    assert stats["truncated"] == 2 and stats["dropped"] == 1 and stats["examples"] == 2
    (ids0, mask0), (ids1, _) = examples
    assert (ids0, mask0) == tok.render_chat(two_turns[:2])  # exactly the first exchange, <|end|> included
    assert ids0[-1] == tok.end_id and mask0[-1] == 1
    assert ids1 == tok.render_chat(short)[0]
    with pytest.raises(UserError, match="too_long='trim' is not known"):
        render_examples(tok, tmp_path / "t.jsonl", 32, too_long="trim")


def test_bad_lines_name_file_and_line(tok, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": conv("a", "b")}) + "\n\n{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl:3: not valid JSON"):
        render_examples(tok, p, 64)
    p.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: expected"):
        render_examples(tok, p, 64)
    p.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: message 0: role 'robot'"):
        render_examples(tok, p, 64)


def test_missing_file(tok, tmp_path):
    with pytest.raises(UserError, match="run `chatforge prepare`"):
        render_examples(tok, tmp_path / "sft_train.jsonl", 64)


def test_real_alpaca_sample(tok, tmp_path):
    src = DATA / "sft" / "alpaca_cleaned_first5000.json"
    if not src.is_file():
        pytest.skip("shared data not present")
    recs = json.loads(src.read_text(encoding="utf-8"))[:200]
    convs = [conv((r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")), r["output"]) for r in recs]
    examples, stats = render_examples(tok, write_jsonl(tmp_path / "sft.jsonl", convs), seq_len=128)
    assert stats["examples"] + stats["dropped"] == 200 and stats["dropped"] == stats["truncated"] > 0
    kept = [c for c in convs if len(tok.render_chat(c)[0]) <= 129]  # single turns: whole, or not at all
    assert len(kept) == len(examples)
    for (ids, mask), c in zip(examples, kept):
        assert ids[0] == tok.bos_id and ids[-1] == tok.end_id  # the learned tokens: exactly answer + <|end|>
        learned = [i for i, m in zip(ids, mask) if m]
        assert learned[-1] == tok.end_id and tok.decode(learned[:-1]) == c[-1]["content"]
