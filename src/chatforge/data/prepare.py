"""The `prepare` stage: raw inputs -> cleaned, deduplicated, split, zstd-compressed JSONL shards + manifest.

Pretraining corpus (`prepare_corpus`): stream documents, clean, filter by length, drop exact (and optionally near)
duplicates, assign each document to train/val by a salted hash of its text, write shards. Memory stays bounded:
only 16-byte digests (and, with near-dedup, MinHash bands) are kept per document.

Validation never ends up empty when there are two or more documents: if the hash split puts nothing in val, the
train document with the smallest split hash is moved there, so evaluation downstream always has data.

Fine-tuning set (`prepare_sft`): chat records in any of the common shapes -> {"messages": [...]}, validated,
split by the hash of the first user message so that no question appears in both splits.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard
from tqdm import tqdm

from ..config import DataConfig, SFTDataConfig
from ..errors import UserError
from .clean import clean_text, transform
from .dedup import ExactDedup, NearDedup, split_fraction
from .sources import JSON_SUFFIXES, ReadStats, expand_inputs, iter_json_objects, iter_records
from .stdlib_corpus import iter_stdlib_documents, stdlib_chat_examples, stdlib_root

SHARD_BYTES = 64 << 20  # roll to a new shard after ~64 MB of uncompressed JSONL
ZSTD_LEVEL = 3
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def _progress(it, desc: str, unit: str):
    return tqdm(it, desc=desc, unit=unit, disable=not sys.stderr.isatty(), smoothing=0.1)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Writes {split}-00000.jsonl.zst, {split}-00001... with single-threaded zstd (deterministic bytes)."""

    def __init__(self, out_dir: Path, split: str, shard_bytes: int = SHARD_BYTES) -> None:
        self.out_dir, self.split, self.shard_bytes = out_dir, split, shard_bytes
        self.shards: list[dict] = []
        self.documents = 0
        self.text_bytes = 0
        self._writer = None
        self._cur: dict = {}
        self._open()

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.jsonl.zst"
        fh = open(self.out_dir / name, "wb")
        self._writer = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0).stream_writer(fh)
        self._cur = {"file": name, "documents": 0, "bytes": 0}
        self.shards.append(self._cur)

    def _finish(self) -> None:
        self._writer.close()
        path = self.out_dir / self._cur["file"]
        self._cur["compressed_bytes"] = path.stat().st_size
        self._cur["sha256"] = _sha256(path)

    def write(self, text: str, source: str, nbytes: int) -> None:
        line = (json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n").encode("utf-8")
        if self._cur["documents"] and self._cur["bytes"] + len(line) > self.shard_bytes:
            self._finish()
            self._open()
        self._writer.write(line)
        self._cur["documents"] += 1
        self._cur["bytes"] += len(line)
        self.documents += 1
        self.text_bytes += nbytes

    def close(self) -> dict:
        self._finish()
        return {"documents": self.documents, "bytes": self.text_bytes, "shards": self.shards}


def _clear_outputs(out_dir: Path) -> None:
    """Remove an earlier run's outputs so a smaller rerun leaves no stale shards (manifest first: it marks
    a finished run)."""
    for name in [MANIFEST, "rejects.jsonl"]:
        (out_dir / name).unlink(missing_ok=True)
    for split in SPLITS:
        for p in out_dir.glob(f"{split}-*.jsonl.zst"):
            p.unlink()


def _iter_input_documents(cfg: DataConfig, stats: ReadStats) -> Iterator[tuple[str, str, str]]:
    """(raw text, per-document source, input label for the manifest's per-source counts)."""
    if not cfg.inputs:
        label = f"python-stdlib:{stdlib_root()}"
        for doc in iter_stdlib_documents():
            yield doc["text"], doc["source"], label
        return
    for path in expand_inputs(cfg.inputs):
        src = str(path)
        for text, _, line in iter_records(path, cfg.text_field, stats):
            yield text, f"{src}:{line}", src


def prepare_corpus(cfg: DataConfig, out_dir: Path) -> dict:
    """Build the pretraining corpus in out_dir; returns (and writes) the manifest. See the module doc."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out_dir)
    stats = ReadStats(rejects_path=out_dir / "rejects.jsonl")
    exact = ExactDedup()
    near = NearDedup(cfg.near_dedup_threshold) if cfg.near_dedup else None
    writers = {s: ShardWriter(out_dir, s) for s in SPLITS}
    drops: dict[str, dict[str, int]] = {}
    sources: dict[str, Counter] = {}
    n_read = kept = kept_bytes = 0
    stopped_by = None
    # The train document with the smallest split hash, held back until val has a document: if val is still
    # empty at the end, it goes there instead (see module doc).
    held: tuple[float, str, str, int] | None = None

    def drop(reason: str, nbytes: int) -> None:
        d = drops.setdefault(reason, {"documents": 0, "bytes": 0})
        d["documents"] += 1
        d["bytes"] += nbytes

    docs = _iter_input_documents(cfg, stats)
    try:
        for raw, source, label in _progress(docs, "prepare", "doc"):
            n_read += 1
            src_counts = sources.setdefault(label, Counter())
            src_counts["documents_read"] += 1
            text = transform(raw, cfg.lowercase, cfg.remove_stopwords)
            nchars = len(text)
            nbytes = len(text.encode("utf-8"))
            if nchars == 0:
                drop("empty", len(raw.encode("utf-8", errors="replace")))
                continue
            if nchars < cfg.min_chars:
                drop("too_short", nbytes)
                continue
            if cfg.max_chars and nchars > cfg.max_chars:
                drop("too_long", nbytes)
                continue
            if exact.is_duplicate(text):
                drop("duplicate", nbytes)
                continue
            if near is not None and near.is_duplicate(text):
                drop("near_duplicate", nbytes)
                continue
            kept += 1
            kept_bytes += nbytes
            src_counts["documents_kept"] += 1
            src_counts["bytes_kept"] += nbytes
            u = split_fraction(text, cfg.split_salt)
            if u < cfg.val_fraction:
                writers["val"].write(text, source, nbytes)
                if held is not None:  # val has data now: nothing needs holding back any more
                    writers["train"].write(*held[1:])
                    held = None
            elif writers["val"].documents == 0 and (held is None or u < held[0]):
                if held is not None:
                    writers["train"].write(*held[1:])
                held = (u, text, source, nbytes)
            else:
                writers["train"].write(text, source, nbytes)
            if cfg.max_docs and kept >= cfg.max_docs:
                stopped_by = "max_docs"
                break
            if cfg.max_bytes and kept_bytes >= cfg.max_bytes:
                stopped_by = "max_bytes"
                break
    finally:
        docs.close()
        stats.close()
    val_forced = False
    if held is not None:
        if kept >= 2 and writers["val"].documents == 0:
            writers["val"].write(*held[1:])
            val_forced = True
        else:
            writers["train"].write(*held[1:])
    splits = {s: w.close() for s, w in writers.items()}

    inputs_label = ", ".join(cfg.inputs) if cfg.inputs else "the Python standard library"
    if kept == 0:
        _clear_outputs(out_dir)
        reasons = {**{k: v["documents"] for k, v in drops.items()}, **stats.counts}
        why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "no documents found"
        raise UserError(f"no usable text in {inputs_label}: {n_read} documents read, all dropped ({why}); "
                        f"check the files and data.min_chars/max_chars/text_field")

    manifest = {
        "format": "chatforge-corpus/1",
        "inputs": list(cfg.inputs) or ["<python-stdlib>"],
        "sources": [{"path": k, **dict(sorted(v.items()))} for k, v in sources.items()],
        "documents_read": n_read,
        "documents_kept": kept,
        "splits": splits,
        "val_forced": val_forced,
        "dropped": dict(sorted(drops.items())),
        "read_errors": dict(sorted(stats.counts.items())),
        "rejects_file": "rejects.jsonl" if (out_dir / "rejects.jsonl").exists() else None,
        "stopped_by": stopped_by,
        "config": dataclasses.asdict(cfg),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def iter_documents(data_dir: Path, split: str) -> Iterator[str]:
    """Texts of one prepared split, in file order."""
    data_dir = Path(data_dir)
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; use one of: {', '.join(SPLITS)}")
    mpath = data_dir / MANIFEST
    if not mpath.is_file():
        raise UserError(f"no prepared corpus in {data_dir} (missing {MANIFEST}); run `chatforge prepare` first")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    dctx = zstandard.ZstdDecompressor()
    for shard in manifest["splits"][split]["shards"]:
        path = data_dir / shard["file"]
        if not path.is_file():
            raise UserError(f"{path} is listed in {mpath} but missing; run `chatforge prepare` again")
        with open(path, "rb") as fh, dctx.stream_reader(fh) as reader:
            for line in io.TextIOWrapper(reader, encoding="utf-8"):
                yield json.loads(line)["text"]


# ============================================================================================ SFT

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}
_ROLES = {"system", "user", "assistant"}
_KNOWN_SHAPES = ("messages (OpenAI), conversations (ShareGPT: from/value), instruction/output (Alpaca), "
                 "prompt/completion, question/answer")


class _Skip(Exception):
    """A record that is understood but unusable; the message is the reason counted in the manifest."""


def normalize_chat(rec: Any) -> tuple[str, list[dict]] | None:
    """(format name, messages) for a known record shape; None for an unknown shape. Raises _Skip(reason)."""
    if not isinstance(rec, dict):
        return None
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise _Skip("bad_structure")
        out = []
        for m in msgs:
            role = m.get("role")
            out.append({"role": role.lower() if isinstance(role, str) else role, "content": m.get("content")})
        return "openai", out
    if "conversations" in rec:
        conv = rec["conversations"]
        if not isinstance(conv, list) or not all(isinstance(m, dict) for m in conv):
            raise _Skip("bad_structure")
        out = []
        for m in conv:
            who = m.get("from", m.get("role"))
            role = _SHAREGPT_ROLES.get(who.lower(), who) if isinstance(who, str) else who
            out.append({"role": role, "content": m.get("value", m.get("content"))})
        return "sharegpt", out
    if "instruction" in rec and "output" in rec:
        user = rec["instruction"]
        extra = rec.get("input")
        if isinstance(user, str) and isinstance(extra, str) and extra.strip():
            user = f"{user}\n\n{extra}"
        out = []
        if isinstance(rec.get("system"), str) and rec["system"].strip():
            out.append({"role": "system", "content": rec["system"]})
        history = rec.get("history") or []  # LLaMA-Factory style: [[user, assistant], ...] earlier turns
        if not isinstance(history, list):
            raise _Skip("bad_structure")
        for turn in history:
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
                raise _Skip("bad_structure")
            out += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
        return "alpaca", out
    for q, a, name in (("prompt", "completion", "prompt_completion"), ("question", "answer", "question_answer")):
        if q in rec and a in rec:
            return name, [{"role": "user", "content": rec[q]}, {"role": "assistant", "content": rec[a]}]
    return None


def validate_messages(msgs: list[dict]) -> list[dict]:
    """Cleaned messages, or _Skip(reason): optional leading system turn, then user/assistant alternating,
    ending with the assistant."""
    if not msgs:
        raise _Skip("empty")
    for m in msgs:
        if m["role"] not in _ROLES:
            raise _Skip("bad_role")
        if not isinstance(m["content"], str):
            raise _Skip("non_string_content")
    if not any(m["role"] == "assistant" for m in msgs):
        raise _Skip("no_assistant")
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if not body or any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(body)) \
            or body[-1]["role"] != "assistant":
        raise _Skip("bad_order")
    out = [{"role": m["role"], "content": clean_text(m["content"])} for m in msgs]
    if any(not m["content"] for m in out if m["role"] != "system"):
        raise _Skip("empty_content")
    return out


def _iter_sft_records(cfg: SFTDataConfig, stats: ReadStats) -> Iterator[tuple[Any, str, str, int]]:
    """(record, file label, source, index within file) for every input record."""
    if not cfg.inputs:
        for i, ex in enumerate(stdlib_chat_examples()):
            yield ex, "<python-stdlib-docstrings>", f"stdlib-docstrings:{i + 1}", i
        return
    for path in expand_inputs(cfg.inputs, JSON_SUFFIXES):
        for i, (rec, line) in enumerate(iter_json_objects(path, stats)):
            yield rec, str(path), f"{path}:{line}", i


def _question_hash(msgs: list[dict]) -> bytes:
    first_user = next(m["content"] for m in msgs if m["role"] == "user")
    return hashlib.blake2b(("sft\0" + " ".join(first_user.split())).encode("utf-8"), digest_size=8).digest()


def prepare_sft(cfg: SFTDataConfig, out_dir: Path) -> dict:
    """Chat examples -> out_dir/sft_train.jsonl, sft_val.jsonl, sft_manifest.json; returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sft_manifest.json").unlink(missing_ok=True)
    stats = ReadStats(rejects_path=out_dir / "sft_rejects.jsonl")
    (out_dir / "sft_rejects.jsonl").unlink(missing_ok=True)
    skipped: Counter = Counter()
    formats: Counter = Counter()
    examples: list[tuple[bytes, list[dict], str]] = []
    seen: set[bytes] = set()
    usable_in_file: Counter = Counter()
    n_read = 0
    records = _iter_sft_records(cfg, stats)
    try:
        for rec, label, source, idx in _progress(records, "prepare-sft", "example"):
            n_read += 1
            try:
                got = normalize_chat(rec)
                if got is None:
                    if usable_in_file[label] == 0:
                        keys = ", ".join(map(str, rec.keys())) if isinstance(rec, dict) else type(rec).__name__
                        raise UserError(f"{source}: unrecognised chat record with keys [{keys}]; expected one of: "
                                        f"{_KNOWN_SHAPES}")
                    raise _Skip("unknown_format")
                fmt, msgs = got
                msgs = validate_messages(msgs)
            except _Skip as e:
                skipped[str(e)] += 1
                continue
            usable_in_file[label] += 1
            key = hashlib.blake2b(json.dumps(msgs, sort_keys=True).encode(), digest_size=16).digest()
            if key in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(key)
            formats[fmt] += 1
            examples.append((_question_hash(msgs), msgs, source))
            if cfg.max_examples and len(examples) >= cfg.max_examples:
                break
    finally:
        records.close()
        stats.close()
    skipped.update(stats.counts)
    label = ", ".join(cfg.inputs) if cfg.inputs else "the stdlib docstring set"
    if not examples:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "no records found"
        raise UserError(f"no usable chat examples in {label}: {n_read} records read, all skipped ({why})")

    threshold = int(cfg.val_fraction * 2**64)
    in_val = [int.from_bytes(h, "big") < threshold for h, _, _ in examples]
    val_forced = False
    if not any(in_val) and len(examples) >= 2:
        # Move every example sharing the smallest question hash, so a question never sits in both splits
        # (unless that is every example: then there is only one question and nothing to hold out).
        smallest = min(h for h, _, _ in examples)
        candidate = [h == smallest for h, _, _ in examples]
        if not all(candidate):
            in_val, val_forced = candidate, True
    counts = {"train": 0, "val": 0}
    with open(out_dir / "sft_train.jsonl", "w", encoding="utf-8") as ft, \
            open(out_dir / "sft_val.jsonl", "w", encoding="utf-8") as fv:
        for (h, msgs, source), v in zip(examples, in_val):
            (fv if v else ft).write(json.dumps({"messages": msgs, "source": source}, ensure_ascii=False) + "\n")
            counts["val" if v else "train"] += 1
    manifest = {
        "format": "chatforge-sft/1",
        "inputs": list(cfg.inputs) or ["<python-stdlib-docstrings>"],
        "records_read": n_read,
        "counts": counts,
        "formats": dict(sorted(formats.items())),
        "skipped": dict(sorted(skipped.items())),
        "val_forced": val_forced,
        "files": {name: _sha256(out_dir / name) for name in ("sft_train.jsonl", "sft_val.jsonl")},
        "config": dataclasses.asdict(cfg),
    }
    (out_dir / "sft_manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return manifest
