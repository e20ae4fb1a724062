"""The prepare stage end to end on real files: determinism, splits, dedup, errors, stdlib corpora, SFT formats."""
from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

import pytest

from chatforge.config import DataConfig, SFTDataConfig
from chatforge.data.clean import clean_text
from chatforge.data.chat import prepare_sft
from chatforge.data.documents import iter_documents
from chatforge.data.prepare import prepare_corpus
from chatforge.data.stdlib_corpus import iter_stdlib_documents, stdlib_chat_examples
from chatforge.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = "apple river stone cloud seven orange quiet lamp garden tiger music paper window silver bread".split()


def _doc(rng: random.Random, n: int = 60) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _corpus(tmp_path: Path, n: int = 200, seed: int = 0) -> Path:
    rng = random.Random(seed)
    return _write_jsonl(tmp_path / "corpus.jsonl", [_doc(rng) for _ in range(n)])


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_clean_text_keeps_code_and_newlines():
    src = "def f(x):\r\n    return x\t# tab kept   \r\n\n\n\n\n\nclass A:\x07\n    pass\u00a0\n"
    assert clean_text(src) == "def f(x):\n    return x\t# tab kept\n\n\nclass A:\n    pass"  # 2 blank lines max
    assert clean_text("Cafe\u0301") == "Caf\u00e9"  # NFC
    assert clean_text(clean_text(src)) == clean_text(src)


def test_two_runs_are_byte_identical(tmp_path):
    cfg = DataConfig(inputs=[str(_corpus(tmp_path))], val_fraction=0.1, min_chars=10)
    m1 = prepare_corpus(cfg, tmp_path / "a")
    m2 = prepare_corpus(cfg, tmp_path / "b")
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
    assert m1 == m2
    shard = m1["splits"]["train"]["shards"][0]
    assert len(shard["sha256"]) == 64 and shard["documents"] == m1["splits"]["train"]["documents"]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["config"]["val_fraction"] == 0.1 and manifest["documents_kept"] == 200


def test_split_is_stable_under_reordering_and_salt_dependent(tmp_path):
    rng = random.Random(1)
    docs = [_doc(rng) for _ in range(300)]
    a = _write_jsonl(tmp_path / "a.jsonl", docs)
    b = _write_jsonl(tmp_path / "b.jsonl", list(reversed(docs)))
    prepare_corpus(DataConfig(inputs=[str(a)], val_fraction=0.2), tmp_path / "oa")
    prepare_corpus(DataConfig(inputs=[str(b)], val_fraction=0.2), tmp_path / "ob")
    val_a = set(iter_documents(tmp_path / "oa", "val"))
    val_b = set(iter_documents(tmp_path / "ob", "val"))
    assert val_a == val_b and 30 < len(val_a) < 90
    assert val_a.isdisjoint(iter_documents(tmp_path / "oa", "train"))
    prepare_corpus(DataConfig(inputs=[str(a)], val_fraction=0.2, split_salt="other"), tmp_path / "oc")
    assert set(iter_documents(tmp_path / "oc", "val")) != val_a


def test_exact_dedup_counts_copies(tmp_path):
    rng = random.Random(2)
    docs = [_doc(rng) for _ in range(50)]
    # 10 exact copies, and 5 copies that differ only in whitespace/line wrapping (same after normalisation).
    texts = docs + docs[:10] + [d.replace(" ", "\n", 3) + "  " for d in docs[10:15]]
    m = prepare_corpus(DataConfig(inputs=[str(_write_jsonl(tmp_path / "d.jsonl", texts))]), tmp_path / "o")
    assert m["dropped"]["duplicate"]["documents"] == 15
    assert m["documents_kept"] == 50


def test_near_dedup_drops_a_near_copy(tmp_path):
    rng = random.Random(3)
    docs = [_doc(rng, 200) for _ in range(20)]
    words = docs[0].split()
    words[100] = "zebra"  # one word changed: not an exact copy, but a near one
    near = " ".join(words)
    path = _write_jsonl(tmp_path / "d.jsonl", docs + [near])
    m_off = prepare_corpus(DataConfig(inputs=[str(path)]), tmp_path / "off")
    m_on = prepare_corpus(DataConfig(inputs=[str(path)], near_dedup=True), tmp_path / "on")
    assert m_off["documents_kept"] == 21
    assert m_on["documents_kept"] == 20 and m_on["dropped"]["near_duplicate"]["documents"] == 1


def test_length_filters_limits_and_forced_val(tmp_path):
    rng = random.Random(4)
    texts = ["tiny"] + [_doc(rng) for _ in range(30)] + ["x " * 3000]
    path = _write_jsonl(tmp_path / "d.jsonl", texts)
    m = prepare_corpus(DataConfig(inputs=[str(path)], min_chars=20, max_chars=2000, val_fraction=0.0),
                       tmp_path / "o")
    assert m["dropped"]["too_short"]["documents"] == 1 and m["dropped"]["too_long"]["documents"] == 1
    # val_fraction 0 would leave val empty: exactly one document is moved there, deterministically.
    assert m["val_forced"] and m["splits"]["val"]["documents"] == 1 and m["splits"]["train"]["documents"] == 29
    m2 = prepare_corpus(DataConfig(inputs=[str(path)], max_docs=5), tmp_path / "o2")
    assert m2["documents_kept"] == 5 and m2["stopped_by"] == "max_docs"
    m3 = prepare_corpus(DataConfig(inputs=[str(path)], max_bytes=1000), tmp_path / "o3")
    assert m3["stopped_by"] == "max_bytes" and 1000 <= sum(m3["splits"][s]["bytes"] for s in ("train", "val")) < 2000


def test_bad_inputs_are_counted_rejected_or_reported(tmp_path):
    rng = random.Random(5)
    good = [_doc(rng) for _ in range(20)]
    data = tmp_path / "in"
    data.mkdir()
    lines = [json.dumps({"text": t}) for t in good]
    lines.insert(3, '{"text": "unterminated')
    (data / "a.jsonl").write_text("\n".join(lines) + "\n")
    (data / "b.txt").write_bytes(b"Caf\xe9 society was a phrase used for fashionable people.\n")
    (data / "c.txt").write_bytes(b"")
    (data / "d.txt").write_bytes(b"\x00\x01\x02\x03" * 1000)
    blob = gzip.compress("".join(json.dumps({"text": _doc(rng)}) + "\n" for _ in range(3000)).encode())
    (data / "e.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    m = prepare_corpus(DataConfig(inputs=[str(data)]), tmp_path / "o")
    errs = m["read_errors"]
    # The bad line in a.jsonl, and the half line where the truncated archive stops.
    assert errs["malformed_json"] == 2 and errs["invalid_utf8"] == 1
    assert errs["empty_file"] == 1 and errs["binary_file"] == 1 and errs["truncated_file"] == 1
    rejects = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["where"] == f"{data / 'a.jsonl'}:4"
    assert rejects[1]["where"].startswith(f"{data / 'e.jsonl.gz'}:")
    by_src = {s["path"]: s for s in m["sources"]}
    assert by_src[str(data / "a.jsonl")]["documents_kept"] == 20
    assert 100 < by_src[str(data / "e.jsonl.gz")]["documents_kept"] < 3000


def test_no_usable_text_and_missing_path_raise_user_errors(tmp_path):
    path = _write_jsonl(tmp_path / "short.jsonl", ["hi", "yo", "ok"])
    with pytest.raises(UserError, match=r"no usable text in .*3 documents read, all dropped \(too_short: 3\)"):
        prepare_corpus(DataConfig(inputs=[str(path)]), tmp_path / "o")
    assert not (tmp_path / "o" / "manifest.json").exists()
    with pytest.raises(UserError, match="missing_file.txt"):
        prepare_corpus(DataConfig(inputs=[str(tmp_path / "missing_file.txt")]), tmp_path / "o")
    with pytest.raises(UserError, match="prepare"):
        list(iter_documents(tmp_path / "nothing_here", "train"))


def test_stdlib_corpus_is_real_python(tmp_path):
    first = []
    for doc in iter_stdlib_documents():
        first.append(doc)
        if len(first) == 50:
            break
    assert all("test/" not in d["source"] and "site-packages" not in d["source"] for d in first)
    assert [d["source"] for d in first] == sorted(d["source"] for d in first)
    m = prepare_corpus(DataConfig(max_docs=40), tmp_path / "o")
    assert m["documents_kept"] == 40 and m["splits"]["val"]["documents"] >= 1
    texts = list(iter_documents(tmp_path / "o", "train")) + list(iter_documents(tmp_path / "o", "val"))
    assert len(texts) == 40 and sum("def " in t for t in texts) > 20


def test_stdlib_chat_examples_unique_and_split_cleanly(tmp_path):
    examples = stdlib_chat_examples()
    questions = [e["messages"][0]["content"] for e in examples]
    assert len(examples) > 1000 and len(set(questions)) == len(questions)
    by_q = dict(zip(questions, (e["messages"][1]["content"] for e in examples)))
    dumps_q = next(q for q in questions if re.search(r"\bjson\.dumps[ ?.]", q))
    assert "JSON" in by_q[dumps_q]
    assert all(len(a) <= 420 and "\n" not in a for a in by_q.values())
    assert stdlib_chat_examples(50) == stdlib_chat_examples(50) and len(stdlib_chat_examples(50)) == 50
    m = prepare_sft(SFTDataConfig(max_examples=400), tmp_path / "s")
    train = [json.loads(x) for x in (tmp_path / "s" / "sft_train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (tmp_path / "s" / "sft_val.jsonl").read_text().splitlines()]
    assert len(train) + len(val) == 400 and len(val) >= 1 and m["counts"] == {"train": len(train), "val": len(val)}
    first_q = lambda ex: ex["messages"][0]["content"]  # noqa: E731
    assert {first_q(e) for e in train}.isdisjoint(first_q(e) for e in val)


def test_sft_formats_are_normalised_and_bad_records_counted(tmp_path):
    recs = [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                           {"from": "gpt", "value": "Hello."}]},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say yes.", "input": "", "output": "Yes."},
        {"prompt": "Capital of France?", "completion": "Paris."},
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]},
        {"messages": []},  # empty
        {"messages": [{"role": "user", "content": "only a question"}]},  # no assistant
        {"messages": [{"role": "user", "content": ["a", "list"]}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},  # order
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},  # role
        {"something": "else"},  # unknown shape after usable ones: skipped, not fatal
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = prepare_sft(SFTDataConfig(inputs=[str(path)], val_fraction=0.0), tmp_path / "o")
    assert m["skipped"] == {"bad_order": 1, "bad_role": 1, "empty": 1, "no_assistant": 1,
                            "non_string_content": 1, "unknown_format": 1}
    assert m["formats"] == {"alpaca": 2, "openai": 1, "prompt_completion": 1, "sharegpt": 1}
    out = [json.loads(x)["messages"] for x in ((tmp_path / "o" / "sft_train.jsonl").read_text()
                                               + (tmp_path / "o" / "sft_val.jsonl").read_text()).splitlines()]
    assert m["counts"]["val"] == 1 and m["val_forced"]
    assert [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}] in out
    assert [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}] in out
    assert [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}] in out
    assert [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}] in out


def test_sft_unknown_first_record_is_a_user_error(tmp_path):
    path = tmp_path / "weird.jsonl"
    path.write_text(json.dumps({"query": "x", "reply": "y"}) + "\n")
    with pytest.raises(UserError, match=r"weird.jsonl:1: .*keys \[query, reply\]"):
        prepare_sft(SFTDataConfig(inputs=[str(path)]), tmp_path / "o")


def test_shared_data_prepares(tmp_path):
    if not SHARED.is_dir():
        pytest.skip("shared data not present")
    m = prepare_corpus(DataConfig(inputs=[str(SHARED / "tinyshakespeare.txt")]), tmp_path / "o")
    assert m["documents_kept"] > 20 and m["splits"]["val"]["documents"] >= 1
    assert "ROMEO" in "".join(iter_documents(tmp_path / "o", "train"))
    s = prepare_sft(SFTDataConfig(inputs=[str(SHARED / "sft" / "lima.json")]), tmp_path / "s")
    assert s["formats"] == {"alpaca": sum(s["counts"].values())} and s["counts"]["val"] > 50


def test_a_100_mb_line_is_dropped_and_counted_while_its_neighbours_survive(tmp_path):
    rng = random.Random(9)
    before, after = _doc(rng), _doc(rng)
    huge = "x" * 100_000_000  # one 100 MB record, far over data.max_chars
    data = tmp_path / "in"
    data.mkdir()
    with open(data / "a.jsonl", "w") as f:
        for t in (before, huge, after):
            f.write(json.dumps({"text": t}) + "\n")
    with open(data / "b.txt", "w") as f:  # a plain-text file that is one 100 MB line
        f.write(huge)
    del huge
    m = prepare_corpus(DataConfig(inputs=[str(data)], val_fraction=0.0), tmp_path / "o")
    kept = list(iter_documents(tmp_path / "o", "train")) + list(iter_documents(tmp_path / "o", "val"))
    assert sorted(kept) == sorted([before, after])
    dropped = sum(d["documents"] for d in m["dropped"].values())
    dropped_bytes = sum(d["bytes"] for d in m["dropped"].values())
    assert dropped >= 2 and dropped_bytes >= 2 * 100_000_000 * 0.99, m["dropped"]
