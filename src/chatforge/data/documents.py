"""The on-disk format of a prepared corpus: zstd-compressed JSONL shards plus manifest.json.

A corpus folder holds {split}-00000.jsonl.zst, {split}-00001.jsonl.zst, ... for each split in SPLITS, one
{"text", "source"} record per line, and a manifest (format CORPUS_FORMAT) listing every shard with its
document count, sizes and sha256. A part of a sharded run (format PART_FORMAT) holds part-*.jsonl.zst
instead, each record also carrying its order key "k". The manifest is written last: it marks a finished run.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import zstandard

from ..errors import UserError

SHARD_BYTES = 64 << 20  # roll to a new shard after ~64 MB of uncompressed JSONL
ZSTD_LEVEL = 3
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
CORPUS_FORMAT = "chatforge-corpus/1"
PART_FORMAT = "chatforge-corpus-part/1"
PART_PREFIX = "part"  # a sharded run writes part-00000.jsonl.zst, ...


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class DocumentWriter:
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
        self._cur["sha256"] = sha256_file(path)

    def write_record(self, record: dict, nbytes: int) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        if self._cur["documents"] and self._cur["bytes"] + len(line) > self.shard_bytes:
            self._finish()
            self._open()
        self._writer.write(line)
        self._cur["documents"] += 1
        self._cur["bytes"] += len(line)
        self.documents += 1
        self.text_bytes += nbytes

    def write(self, text: str, source: str, nbytes: int) -> None:
        self.write_record({"text": text, "source": source}, nbytes)

    def close(self) -> dict:
        self._finish()
        return {"documents": self.documents, "bytes": self.text_bytes, "shards": self.shards}


def read_jsonl_zst(path: Path) -> Iterator[dict]:
    """Records of one shard, streamed."""
    with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as reader:
        for line in io.TextIOWrapper(reader, encoding="utf-8"):
            yield json.loads(line)


def clear_outputs(out_dir: Path) -> None:
    """Remove an earlier run's outputs so a smaller rerun leaves no stale shards (manifest first: it marks
    a finished run)."""
    for name in [MANIFEST, "rejects.jsonl"]:
        (out_dir / name).unlink(missing_ok=True)
    for split in (*SPLITS, PART_PREFIX):
        for p in out_dir.glob(f"{split}-*.jsonl.zst"):
            p.unlink()


def write_manifest(out_dir: Path, manifest: dict) -> None:
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def iter_documents(data_dir: Path, split: str) -> Iterator[str]:
    """Texts of one prepared split, in file order."""
    data_dir = Path(data_dir)
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; use one of: {', '.join(SPLITS)}")
    mpath = data_dir / MANIFEST
    if not mpath.is_file():
        raise UserError(f"no prepared corpus in {data_dir} (missing {MANIFEST}); run `chatforge prepare` first")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    if manifest.get("format") == PART_FORMAT:
        raise UserError(f"{data_dir} holds part {manifest['shard_index']} of a {manifest['num_shards']}-way "
                        f"sharded prepare; join the parts with `chatforge merge` first")
    for shard in manifest["splits"][split]["shards"]:
        path = data_dir / shard["file"]
        if not path.is_file():
            raise UserError(f"{path} is listed in {mpath} but missing; run `chatforge prepare` again")
        for rec in read_jsonl_zst(path):
            yield rec["text"]
