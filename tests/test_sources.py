"""Reading raw inputs: formats, compression, and every bad-input case, on real files written to tmp_path."""
from __future__ import annotations

import bz2
import gzip
import json
import lzma

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from chatforge.data.sources import ReadStats, expand_inputs, iter_records
from chatforge.errors import UserError

LINES = [{"text": f"document number {i}: " + "words " * 20, "id": i} for i in range(200)]
JSONL = "".join(json.dumps(r) + "\n" for r in LINES).encode()


def _texts(path, **kw):
    stats = kw.pop("stats", None) or ReadStats()
    return [t for t, _, _ in iter_records(path, stats=stats, **kw)], stats


@pytest.mark.parametrize("suffix,compress", [
    ("", lambda b: b),
    (".gz", gzip.compress),
    (".bz2", bz2.compress),
    (".xz", lzma.compress),
    (".zst", lambda b: zstandard.ZstdCompressor().compress(b)),
])
def test_jsonl_with_every_compression(tmp_path, suffix, compress):
    p = tmp_path / f"data.jsonl{suffix}"
    p.write_bytes(compress(JSONL))
    texts, stats = _texts(p)
    assert texts == [r["text"] for r in LINES]
    assert not stats.counts


def test_json_array_csv_parquet_and_text(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"body": "first"}, {"body": "second"}]))
    assert _texts(tmp_path / "a.json", text_field="body")[0] == ["first", "second"]
    (tmp_path / "b.csv").write_text('id,text\n1,"hello, world"\n2,"multi\nline"\n')
    assert _texts(tmp_path / "b.csv")[0] == ["hello, world", "multi\nline"]
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(3000)]}), tmp_path / "c.parquet")
    texts = _texts(tmp_path / "c.parquet")[0]
    assert len(texts) == 3000 and texts[2999] == "row 2999"
    (tmp_path / "d.md").write_text("# Title\n\n    indented code\n")
    assert _texts(tmp_path / "d.md")[0] == ["# Title\n\n    indented code\n"]


def test_long_text_is_cut_at_blank_lines_and_separators(tmp_path):
    para = "A line of prose that goes on for a while.\n" * 10 + "\n"
    p = tmp_path / "book.txt"
    p.write_text(para * 200)  # ~86 KB
    texts, _ = _texts(p, chunk_chars=16_384)
    assert len(texts) > 3 and "".join(texts) == para * 200
    assert all(t.endswith("\n\n") for t in texts[:-1])  # every cut is at a paragraph break
    (tmp_path / "stories.txt").write_text("one story here\n<|endoftext|>\ntwo story\n<|endoftext|>\n")
    assert [t.strip() for t in _texts(tmp_path / "stories.txt")[0]] == ["one story here", "two story"]
    # Python files stay whole, however long.
    (tmp_path / "big.py").write_text(("def f():\n    return 1\n\n\n") * 5000)
    assert len(_texts(tmp_path / "big.py")[0]) == 1


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"caf\xe9 au lait is a drink\n")
    texts, stats = _texts(p)
    assert texts == ["caf\ufffd au lait is a drink\n"]
    assert stats.counts["invalid_utf8"] == 1


def test_malformed_json_line_goes_to_rejects_with_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "good one"}\n{"text": "broken\n{"text": "good two"}\n')
    stats = ReadStats(rejects_path=tmp_path / "rejects.jsonl")
    texts, _ = _texts(p, stats=stats)
    stats.close()
    assert texts == ["good one", "good two"]
    assert stats.counts["malformed_json"] == 1
    rejects = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["where"] for r in rejects] == [f"{p}:2"]


def test_missing_text_field_names_file_line_field_and_existing_fields(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n{"body": "x", "title": "y"}\n{"text": "also fine"}\n')
    stats = ReadStats(rejects_path=tmp_path / "rejects.jsonl")  # one bad record: rejected with file:line
    assert _texts(p, stats=stats)[0] == ["fine", "also fine"] and stats.counts["missing_field"] == 1
    stats.close()
    assert json.loads((tmp_path / "rejects.jsonl").read_text())["where"] == f"{p}:2"
    with pytest.raises(UserError) as e:  # --strict: it stops there
        _texts(p, stats=ReadStats(strict=True))
    msg = str(e.value)
    assert f"{p}:2" in msg and "'text'" in msg and "body" in msg and "title" in msg
    (tmp_path / "none.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')  # no record has it: wrong field
    with pytest.raises(UserError, match="none.jsonl:1: no field 'text'"):
        _texts(tmp_path / "none.jsonl")
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match=r"no field 'text'.*a, b"):
        _texts(tmp_path / "t.csv")


def test_empty_and_binary_files_are_skipped_with_a_count(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n  \n")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    stats = ReadStats()
    for name in ("empty.txt", "blank.jsonl", "image.txt"):
        assert _texts(tmp_path / name, stats=stats)[0] == []
    assert stats.counts["empty_file"] == 2 and stats.counts["binary_file"] == 1
    # A rare NUL used as a record separator in clean text is not "binary": it splits documents.
    story = "Once upon a time a small cat sat in the sun and smiled at the birds all day long.\n" * 3
    (tmp_path / "nul.txt").write_bytes(f"{story}\x00{story}".encode())
    assert [t.strip() for t in _texts(tmp_path / "nul.txt")[0]] == [story.strip(), story.strip()]


@pytest.mark.parametrize("suffix,compress", [
    (".gz", gzip.compress),
    (".zst", lambda b: zstandard.ZstdCompressor().compress(b)),
    (".xz", lzma.compress),
])
def test_truncated_archive_keeps_what_was_read(tmp_path, suffix, compress):
    big = "".join(json.dumps({"text": f"record {i} " + "x" * 100}) + "\n" for i in range(20000)).encode()
    blob = compress(big)
    p = tmp_path / f"cut.jsonl{suffix}"
    p.write_bytes(blob[: len(blob) // 2])
    stats = ReadStats(rejects_path=tmp_path / "rejects.jsonl")
    texts, _ = _texts(p, stats=stats)
    assert stats.counts["truncated_file"] == 1
    assert 1000 < len(texts) < 20000
    assert texts[0].startswith("record 0 ") and texts[-1].startswith(f"record {len(texts) - 1} ")


@pytest.mark.parametrize("suffix,compress", [(".gz", gzip.compress), (".xz", lzma.compress)])
def test_small_truncated_archive_keeps_what_decodes(tmp_path, suffix, compress):
    """A file cut inside the first 8 KB (read to tell text from binary) still keeps what decodes."""
    text = "".join(f"Line {i}: a short sentence of plain English text for the test.\n" for i in range(90))
    blob = compress(text.encode())
    p = tmp_path / f"cut.txt{suffix}"
    p.write_bytes(blob[: len(blob) * 7 // 10])
    stats = ReadStats()
    texts, _ = _texts(p, stats=stats)
    assert stats.counts["truncated_file"] == 1 and stats.counts["empty_file"] == 0
    kept = "".join(texts)
    assert len(kept) > 1000 and text.startswith(kept.rstrip("\n").rsplit("\n", 1)[0])


def test_expand_inputs_files_folders_globs_sorted_and_missing(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "a.jsonl", "sub/c.md.gz", "sub/skip.bin", ".hidden.txt"):
        (tmp_path / name).write_bytes(b"x")
    got = expand_inputs([str(tmp_path)])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["a.jsonl", "b.txt", "sub/c.md.gz"]
    assert expand_inputs([str(tmp_path / "*.txt"), str(tmp_path / "b.txt")]) == [tmp_path / "b.txt"]
    with pytest.raises(UserError, match="nope.txt"):
        expand_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(UserError, match=r"\*.csv"):
        expand_inputs([str(tmp_path / "*.csv")])
