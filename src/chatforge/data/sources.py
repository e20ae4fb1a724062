"""Reading raw inputs: files, folders and globs -> (text, source, line) records.

Every format is read as a stream of bytes (transparently decompressed), so a multi-GB file never has to fit
in memory. Problems in the data itself (bad UTF-8, a malformed JSON line, an empty or binary file, a truncated
archive) are counted in a `ReadStats` and skipped, because one bad line in a large crawl should not stop a run.
Mistakes in how the user points at the data (a missing path, a wrong text field) raise `UserError`.
"""
from __future__ import annotations

import bz2
import csv
import glob
import gzip
import itertools
import json
import logging
import lzma
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import zstandard

from ..errors import UserError
from .clean import html_to_text

log = logging.getLogger("chatforge.data")

COMPRESSION_SUFFIXES = {".gz", ".zst", ".zstd", ".bz2", ".xz"}
TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".py"}
JSON_SUFFIXES = {".jsonl", ".ndjson", ".json"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | HTML_SUFFIXES | {".csv", ".parquet"}
# A Hugging Face dataset written by `Dataset.save_to_disk` (state.json + Arrow stream files) or
# `DatasetDict.save_to_disk` (dataset_dict.json + one such folder per split).
HF_STATE, HF_DICT = "state.json", "dataset_dict.json"
HUB_PREFIX = "hf:"  # data.inputs entry "hf:owner/name" or "hf:owner/name:split" streams from the Hub

# Plain-text files longer than this are cut into several documents at blank lines. A book or a dump of many
# stories as ONE document could only land whole in train or whole in val, and a 1 MB file would be dropped by
# max_chars. Python sources are never cut: a module's definitions and imports belong together.
TEXT_CHUNK_CHARS = 16_384
DOC_SEPARATOR = "<|endoftext|>"  # TinyStories-style dumps mark story boundaries with this line
# A NUL in a text file is a record separator too (the `find -print0` convention; some dumps use it).
BINARY_SNIFF_BYTES = 8192
_READ_SIZE = 1 << 16


@dataclass
class ReadStats:
    """Counts of what was skipped while reading, plus a rejects file (JSONL, one line per rejected record)."""

    rejects_path: Path | None = None
    counts: Counter = field(default_factory=Counter)
    strict: bool = False  # a record without the text field stops the run (else: rejected, counted, skipped)
    _rejects: IO[str] | None = None

    def note(self, reason: str, path: Path | str, message: str = "") -> None:
        self.counts[reason] += 1
        log.warning("%s: %s%s", path, reason.replace("_", " "), f" ({message})" if message else "")

    def reject(self, reason: str, path: Path | str, line: int, raw: str, message: str = "") -> None:
        """Count a skipped record and keep it (truncated) with file:line so the user can find and fix it."""
        self.counts[reason] += 1
        if self.rejects_path is None:
            return
        if self._rejects is None:
            self.rejects_path.parent.mkdir(parents=True, exist_ok=True)
            self._rejects = open(self.rejects_path, "w", encoding="utf-8")
        rec = {"where": f"{path}:{line}", "reason": reason, "error": message, "raw": raw[:500]}
        self._rejects.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._rejects is not None:
            self._rejects.close()
            self._rejects = None


# --------------------------------------------------------------------------------------------- inputs


def _suffixes(path: Path) -> tuple[str, str | None]:
    """('.jsonl', '.gz') for data.jsonl.gz; ('.txt', None) for notes.txt."""
    sfx = [s.lower() for s in path.suffixes]
    comp = sfx[-1] if sfx and sfx[-1] in COMPRESSION_SUFFIXES else None
    rest = sfx[:-1] if comp else sfx
    return (rest[-1] if rest else ""), comp


def is_supported(path: Path) -> bool:
    return _suffixes(path)[0] in SUPPORTED_SUFFIXES


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / HF_STATE).is_file() or (path / HF_DICT).is_file())


def _hf_split_dirs(path: Path) -> list[Path]:
    """A DatasetDict folder -> its split folders in the order dataset_dict.json lists them (all splits are
    read: point data.inputs at one split folder to take only that one)."""
    if (path / HF_STATE).is_file():
        return [path]
    splits = json.loads((path / HF_DICT).read_text(encoding="utf-8")).get("splits", [])
    found = [path / s for s in splits if (path / s / HF_STATE).is_file()]
    if not found:
        raise UserError(f"{path / HF_DICT} lists splits {splits} but none has a {HF_STATE}; is the save complete?")
    return found


def expand_inputs_indexed(patterns: list[str], suffixes: set[str] | None = None) -> list[tuple[int, Path]]:
    """Like expand_inputs, with the index of the pattern (data.inputs entry) each file came from, which is
    what data.weights refers to."""
    wanted = suffixes or SUPPORTED_SUFFIXES
    out: list[tuple[int, Path]] = []
    seen: set[Path] = set()
    for idx, pat in enumerate(patterns):
        p = Path(pat).expanduser()
        if pat.startswith(HUB_PREFIX):
            out.append((idx, Path(pat)))
            continue
        if p.is_file():
            found = [p]
        elif is_hf_dataset_dir(p):
            found = _hf_split_dirs(p)
        elif p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and _suffixes(f)[0] in wanted
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise UserError(f"input folder '{pat}' holds no readable files "
                                f"({', '.join(sorted(wanted))}, optionally compressed)")
        elif any(ch in pat for ch in "*?["):
            found = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not found:
                raise UserError(f"input pattern '{pat}' matches no files; check the path (data.inputs)")
        else:
            raise UserError(f"input '{pat}' does not exist; give a file, folder or glob in data.inputs")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append((idx, f))
    return out


def expand_inputs(patterns: list[str], suffixes: set[str] | None = None) -> list[Path]:
    """Files, folders (recursively: supported files only, hidden ones skipped) and globs -> file list.

    Each pattern's matches are sorted; patterns keep the user's order; a file named twice is read once.
    `suffixes` narrows which files a folder contributes (e.g. only JSON for chat data). A folder written by
    Hugging Face `save_to_disk` is one input (a DatasetDict: one per split); "hf:owner/name" names a Hub dataset.
    """
    return [p for _, p in expand_inputs_indexed(patterns, suffixes)]


# --------------------------------------------------------------------------------------------- bytes


def _raw_chunks(path: Path) -> Iterator[bytes]:
    """Decompressed bytes of a file, chunk by chunk. Raises EOFError when a compressed file is cut short."""
    _, comp = _suffixes(path)
    if comp in (".zst", ".zstd"):
        # zstandard's stream_reader treats a cut-off frame as a clean end; decompressobj tells us (via .eof).
        dctx = zstandard.ZstdDecompressor()
        with open(path, "rb") as fh:
            dobj = dctx.decompressobj()
            pending = False  # input was fed to a frame that has not ended yet
            while True:
                data = fh.read(_READ_SIZE)
                if not data:
                    break
                while data:
                    out = dobj.decompress(data)
                    pending = True
                    if out:
                        yield out
                    if dobj.eof:  # next frame (zstd files may be several concatenated frames)
                        data, pending = dobj.unused_data, False
                        dobj = dctx.decompressobj()
                    else:
                        data = b""
            if pending:
                raise EOFError("zstd stream ended before the end of its frame")
        return
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(comp or "", open)
    with opener(path, "rb") as fh:
        # read1: on a truncated archive we keep everything decoded before the error.
        read = getattr(fh, "read1", fh.read)
        while True:
            data = read(_READ_SIZE)
            if not data:
                return
            yield data


def _looks_binary(head: bytes) -> bool:
    """NUL bytes in the first 8 KB mean binary (images, archives, UTF-16), unless they are a rare separator
    in otherwise clean text: some story dumps put one NUL between records (TinyStories' data00 does)."""
    nuls = head.count(b"\x00")
    if not nuls:
        return False
    if nuls * 200 > len(head):  # more than 0.5% NULs: not a separator
        return True
    rest = head.replace(b"\x00", b"")
    try:
        rest.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(rest) - 4:  # a multi-byte character cut at the 8 KB edge is fine
            return True
    return sum(b < 32 and b not in (9, 10, 12, 13) for b in rest) > len(rest) // 100


def _chunks_checked(path: Path, stats: ReadStats) -> Iterator[bytes]:
    """Raw chunks, with empty/binary files skipped (and noted) and truncation noted instead of raised."""
    truncated = (EOFError, OSError, lzma.LZMAError, zstandard.ZstdError)
    it = _raw_chunks(path)
    head, cut = b"", None
    try:
        try:
            for data in it:
                head += data
                if len(head) >= BINARY_SNIFF_BYTES:
                    break
        except truncated as e:  # a small file cut short: what decoded before the cut is still text to keep
            cut = e
        if not head.strip() and cut is None:
            stats.note("empty_file", path)
            return
        if _looks_binary(head[:BINARY_SNIFF_BYTES]):
            stats.note("binary_file", path, "NUL bytes in the first 8 KB; not text")
            return
        if head:
            yield head
        if cut is None:
            yield from it
    except truncated as e:
        cut = e
    finally:
        it.close()
    if cut is not None:
        stats.note("truncated_file", path, f"kept what was read before: {cut}")


def _iter_lines(path: Path, stats: ReadStats) -> Iterator[tuple[int, bytes]]:
    """(line number, line bytes including its newline)."""
    parts: list[bytes] = []  # pieces of the current line: joined once, so a 100 MB line costs linear time
    no = 0
    for data in _chunks_checked(path, stats):
        parts.append(data)
        if b"\n" not in data:
            continue
        *lines, rest = b"".join(parts).split(b"\n")
        parts = [rest] if rest else []
        for line in lines:
            no += 1
            yield no, line + b"\n"
    if parts:
        yield no + 1, b"".join(parts)


def _decode(raw: bytes) -> tuple[str, bool]:
    """UTF-8 text and whether invalid bytes had to be replaced."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


# --------------------------------------------------------------------------------------------- formats


def _iter_text(path: Path, stats: ReadStats, chunk_chars: int) -> Iterator[tuple[str, str, int]]:
    parts: list[str] = []
    size = 0
    start = 1
    bad = False
    src = str(path)

    def emit() -> tuple[str, str, int] | None:
        nonlocal parts, size, bad
        text = "".join(parts)
        if bad:
            stats.counts["invalid_utf8"] += 1
        parts, size, bad = [], 0, False
        return (text, src, start) if text.strip() else None

    for no, raw in _iter_lines(path, stats):
        line, was_bad = _decode(raw)
        bad |= was_bad
        if "\x00" in line:
            line = line.replace("\x00", DOC_SEPARATOR)
        if DOC_SEPARATOR in line:
            pieces = line.split(DOC_SEPARATOR)
            for piece in pieces[:-1]:
                parts.append(piece)
                doc = emit()
                if doc:
                    yield doc
            line = pieces[-1]
        if not parts:
            start = no
        parts.append(line)
        size += len(line)
        # Cut long files at a paragraph break; failing that (no blank lines at all), at any line.
        if chunk_chars and size >= chunk_chars and (not line.strip() or size >= 2 * chunk_chars):
            doc = emit()
            if doc:
                yield doc
    doc = emit()
    if doc:
        yield doc


def iter_json_objects(path: Path, stats: ReadStats) -> Iterator[tuple[Any, int]]:
    """(parsed record, line number) from JSON Lines, or from a .json file holding one array (or one object).

    Malformed JSON lines are skipped, counted and written to the rejects file with file:line.
    """
    fmt, _ = _suffixes(path)
    lines = _iter_lines(path, stats)
    if fmt == ".json":
        # A .json file may be a JSON array of records, a single object, or JSON Lines in disguise.
        first = None
        held: list[tuple[int, bytes]] = []
        for no, raw in lines:
            held.append((no, raw))
            if raw.strip():
                first = raw.lstrip()[:1]
                break
        if first in (b"[", b"{"):
            rest = [raw for _, raw in held] + [raw for _, raw in lines]
            text, bad = _decode(b"".join(rest))
            if bad:
                stats.counts["invalid_utf8"] += 1
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                if first == b"{":  # JSON Lines with a .json name: parse it line by line
                    yield from _jsonl_objects(path, stats, iter(_split_numbered(text)))
                    return
                stats.reject("malformed_json", path, e.lineno, text.splitlines()[e.lineno - 1] if text else "",
                             f"file is not valid JSON: {e.msg}")
                log.warning("%s:%d: not valid JSON (%s); file skipped", path, e.lineno, e.msg)
                return
            if isinstance(data, list):
                for i, rec in enumerate(data, 1):
                    yield rec, i  # "line" = record number within the array
            else:
                yield data, 1
            return
        lines = itertools.chain(held, lines)
    yield from _jsonl_objects(path, stats, ((no, _decode(raw)) for no, raw in lines))


def _split_numbered(text: str) -> Iterator[tuple[int, tuple[str, bool]]]:
    for no, line in enumerate(text.split("\n"), 1):
        yield no, (line, False)


def _jsonl_objects(path: Path, stats: ReadStats, lines) -> Iterator[tuple[Any, int]]:
    for no, (line, bad) in lines:
        if not line.strip():
            continue
        if bad:
            stats.counts["invalid_utf8"] += 1
        try:
            yield json.loads(line), no
        except json.JSONDecodeError as e:
            stats.reject("malformed_json", path, no, line.rstrip("\n"), e.msg)


def _field_error(path: Path, line: int | str, fieldname: str, fields) -> UserError:
    names = ", ".join(str(f) for f in fields) or "(none)"
    return UserError(f"{path}:{line}: no field '{fieldname}' in the record; its fields are: {names}. "
                     f"Set data.text_field to the field that holds the text")


def _iter_json(path: Path, stats: ReadStats, text_field: str) -> Iterator[tuple[str, str, int]]:
    src = str(path)
    found, first_missing = False, None  # a file where no record has the field: the field name is wrong
    for rec, no in iter_json_objects(path, stats):
        if isinstance(rec, str):  # a bare JSON string per line is text too
            yield rec, src, no
            continue
        if not isinstance(rec, dict):
            stats.reject("not_an_object", path, no, json.dumps(rec)[:500], "expected a JSON object per record")
            continue
        if text_field not in rec:
            if stats.strict:
                raise _field_error(path, no, text_field, rec.keys())
            first_missing = first_missing or (no, list(rec.keys()))
            stats.reject("missing_field", path, no, json.dumps(rec, ensure_ascii=False)[:500],
                         f"no field '{text_field}'")
            continue
        found = True
        value = rec[text_field]
        if not isinstance(value, str):
            stats.reject("not_text", path, no, json.dumps(rec, ensure_ascii=False)[:500],
                         f"field '{text_field}' is {type(value).__name__}, not a string")
            continue
        yield value, src, no
    if first_missing and not found:
        raise _field_error(path, first_missing[0], text_field, first_missing[1])


def _iter_csv(path: Path, stats: ReadStats, text_field: str) -> Iterator[tuple[str, str, int]]:
    csv.field_size_limit(2**31 - 1)  # documents are often longer than csv's 128 KB default cell limit
    src = str(path)
    bad_lines = 0

    def lines() -> Iterator[str]:
        nonlocal bad_lines
        for _, raw in _iter_lines(path, stats):
            line, bad = _decode(raw)
            bad_lines += bad
            yield line

    reader = csv.DictReader(lines())
    if reader.fieldnames is None:
        return
    if text_field not in reader.fieldnames:
        raise _field_error(path, 1, text_field, reader.fieldnames)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            stats.reject("malformed_csv", path, reader.line_num, "", str(e))
            continue
        if bad_lines:
            stats.counts["invalid_utf8"] += 1
            bad_lines = 0
        value = row.get(text_field)
        if value:
            yield value, src, reader.line_num


def _iter_parquet(path: Path, stats: ReadStats, text_field: str) -> Iterator[tuple[str, str, int]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a non-parquet or cut-off file
        stats.note("truncated_file", path, f"cannot read parquet: {e}")
        return
    names = pf.schema_arrow.names
    if text_field not in names:
        raise _field_error(path, "schema", text_field, names)
    src = str(path)
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, bytes):
                value, bad = _decode(value)
                stats.counts["invalid_utf8"] += bad
            if isinstance(value, str):
                yield value, src, row
            elif value is not None:
                stats.reject("not_text", path, row, repr(value)[:500],
                             f"column '{text_field}' holds {type(value).__name__}, not text")


def _iter_html(path: Path, stats: ReadStats) -> Iterator[tuple[str, str, int]]:
    """One document per page: the visible text (see clean.html_to_text). Pages are small, so read whole."""
    raw = b"".join(_chunks_checked(path, stats))
    if raw:
        html, bad = _decode(raw)
        stats.counts["invalid_utf8"] += bad
        text = html_to_text(html)
        if text:
            yield text, str(path), 1


def _iter_hf_disk(path: Path, stats: ReadStats, text_field: str) -> Iterator[tuple[str, str, int]]:
    """Rows of a `save_to_disk` folder, read straight from its Arrow stream files with pyarrow (the
    `datasets` package is not needed); batches are memory-mapped, so a large dataset streams."""
    import pyarrow as pa

    state = json.loads((path / HF_STATE).read_text(encoding="utf-8"))
    files = [path / f["filename"] for f in state.get("_data_files", [])] or sorted(path.glob("*.arrow"))
    src = str(path)
    row = 0
    for f in files:
        if not f.is_file():
            raise UserError(f"{f} is listed in {path / HF_STATE} but missing; save the dataset again")
        try:
            with pa.memory_map(str(f)) as mm:
                try:
                    reader = pa.ipc.open_stream(mm)
                except pa.ArrowInvalid:  # some writers use the Arrow file (random access) format instead
                    reader = pa.ipc.open_file(mm)
                names = reader.schema.names
                if text_field not in names:
                    raise _field_error(path, f.name, text_field, names)
                col = names.index(text_field)
                batches = reader if isinstance(reader, pa.ipc.RecordBatchStreamReader) else \
                    (reader.get_batch(i) for i in range(reader.num_record_batches))
                for batch in batches:
                    for value in batch.column(col).to_pylist():
                        row += 1
                        if isinstance(value, str):
                            yield value, src, row
                        elif value is not None:
                            stats.reject("not_text", path, row, repr(value)[:500],
                                         f"column '{text_field}' holds {type(value).__name__}, not text")
        except (pa.ArrowInvalid, OSError) as e:
            stats.note("truncated_file", f, f"kept the rows read before: {e}")


def _iter_hub(name: str, stats: ReadStats, text_field: str) -> Iterator[tuple[str, str, int]]:
    """A Hub dataset, streamed. Needs `datasets` and a network; says so instead of failing obscurely."""
    spec = name[len(HUB_PREFIX):]
    repo, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise UserError(f"input '{name}': reading a Hub dataset needs the `datasets` package (pip install "
                        f"datasets) and a network; or save it with save_to_disk and give that folder") from None
    try:
        ds = datasets.load_dataset(repo, split=split or "train", streaming=True)
    except Exception as e:  # offline, unknown name, gated repo: all user-fixable
        raise UserError(f"input '{name}': cannot stream it from the Hugging Face Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check the name and the network") from None
    for row, rec in enumerate(ds, 1):
        if text_field not in rec:
            raise _field_error(name, row, text_field, rec.keys())
        if isinstance(rec[text_field], str):
            yield rec[text_field], name, row


def iter_records(path: Path | str, text_field: str = "text", stats: ReadStats | None = None,
                 chunk_chars: int = TEXT_CHUNK_CHARS) -> Iterator[tuple[str, str, int]]:
    """(text, source, line_no) for every document in one file.

    .txt/.md/.rst/.py: the whole file is one document (long prose files are cut at blank lines into
    ~chunk_chars pieces, and at "<|endoftext|>" separators). .html/.htm: the page's visible text.
    .jsonl/.json/.csv/.parquet, a save_to_disk folder, "hf:name": one document per record, taken from
    `text_field`. .gz/.zst/.bz2/.xz are decompressed on the fly. Other suffixes are read as plain text.
    """
    stats = stats if stats is not None else ReadStats()
    if str(path).startswith(HUB_PREFIX):
        yield from _iter_hub(str(path), stats, text_field)
        return
    path = Path(path)
    if path.is_dir() and (path / HF_STATE).is_file():
        yield from _iter_hf_disk(path, stats, text_field)
        return
    fmt, _ = _suffixes(path)
    if fmt in JSON_SUFFIXES:
        yield from _iter_json(path, stats, text_field)
    elif fmt == ".csv":
        yield from _iter_csv(path, stats, text_field)
    elif fmt == ".parquet":
        yield from _iter_parquet(path, stats, text_field)
    elif fmt in HTML_SUFFIXES:
        yield from _iter_html(path, stats)
    else:
        yield from _iter_text(path, stats, 0 if fmt == ".py" else chunk_chars)
