"""Joining the parts of a sharded `prepare` (many machines, one part each) into one corpus.

    # on machine i of n (a Slurm array task, a torchrun rank, or n processes on one box):
    prepare_corpus(cfg, Path(f"parts/{i}"), shard_index=i, num_shards=n)
    # once every part is done, anywhere that sees all part folders:
    merge_parts([Path(f"parts/{i}") for i in range(n)], Path("data"), cfg)

Each part holds its filtered, exact-deduplicated documents tagged with their canonical order key (input file
index, record number). The merge is a k-way merge by that key, so the documents reach the same `Finisher`
as in a single run, in the same order: duplicates across parts are dropped (exact, and near when
data.near_dedup is on), documents are split by hash and written, and the result is byte-identical to running
`prepare_corpus` once over all inputs. Memory: one open shard per part plus the dedup hashes.
"""
from __future__ import annotations

import dataclasses
import heapq
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from ..config import DataConfig
from ..errors import UserError
from .documents import MANIFEST, PART_FORMAT, clear_outputs, read_jsonl_zst, write_manifest
from .prepare import Finisher, InputFile, build_manifest, merge_drops, no_text_error

# Config fields that may differ between the parts and the merge without changing the result.
_FREE_FIELDS = {"workers"}


def _load_part(part_dir: Path) -> dict:
    mpath = part_dir / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{part_dir} is not a finished prepare part (no {MANIFEST}); rerun that shard "
                        f"with `chatforge prepare --shard i --num-shards n`")
    m = json.loads(mpath.read_text(encoding="utf-8"))
    if m.get("format") != PART_FORMAT:
        raise UserError(f"{mpath} is not a part of a sharded prepare (format {m.get('format')!r}); "
                        f"give the folders written with --shard i --num-shards n")
    return m


def _comparable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in _FREE_FIELDS}


def _iter_part(part_dir: Path, manifest: dict) -> Iterator[tuple[tuple[int, int], dict]]:
    for shard in manifest["part"]["shards"]:
        path = part_dir / shard["file"]
        if not path.is_file():
            raise UserError(f"{path} is listed in {part_dir / MANIFEST} but missing; rerun that shard")
        for rec in read_jsonl_zst(path):
            yield (rec["k"][0], rec["k"][1]), rec


def merge_parts(part_dirs: list[Path], out_dir: Path, cfg: DataConfig | None = None) -> dict:
    """Join the parts into a corpus in out_dir (same layout and manifest as `prepare_corpus`); returns the
    manifest. cfg defaults to the parts' config; when given it must match it (workers aside), because the
    parts were filtered with theirs."""
    part_dirs = [Path(p) for p in part_dirs]
    if not part_dirs:
        raise UserError("merge needs at least one part folder")
    parts = [_load_part(p) for p in part_dirs]
    n = parts[0]["num_shards"]
    indexes = sorted(m["shard_index"] for m in parts)
    if any(m["num_shards"] != n for m in parts) or indexes != list(range(n)):
        raise UserError(f"parts {[str(p) for p in part_dirs]} have shard indexes {indexes} of "
                        f"{sorted({m['num_shards'] for m in parts})} shards; give each of the n parts once")
    base = _comparable(parts[0]["config"])
    for p, m in zip(part_dirs, parts):
        if _comparable(m["config"]) != base:
            diff = sorted(k for k in base if base[k] != m["config"].get(k))
            raise UserError(f"{p} was prepared with a different data config ({', '.join(diff)}); "
                            f"prepare every part with the same config")
        if m["files"] != parts[0]["files"]:
            raise UserError(f"{p} saw a different input file list than {part_dirs[0]}; every machine must "
                            f"see the same inputs")
    if cfg is None:
        cfg = DataConfig(**parts[0]["config"])
    elif _comparable(dataclasses.asdict(cfg)) != base:
        diff = sorted(k for k, v in _comparable(dataclasses.asdict(cfg)).items() if base.get(k) != v)
        raise UserError(f"the merge config differs from the parts' in: {', '.join(diff)}; use the same data config")

    files = [InputFile(**f) for f in parts[0]["files"]]
    out_dir = Path(out_dir)
    if any(out_dir.resolve() == p.resolve() for p in part_dirs):
        raise UserError(f"merge output {out_dir} is one of the parts; give a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_outputs(out_dir)

    order = sorted(range(len(parts)), key=lambda i: parts[i]["shard_index"])
    streams = [_iter_part(part_dirs[i], parts[i]) for i in order]
    fin = Finisher(cfg, out_dir, files)
    try:
        for (fidx, _), rec in heapq.merge(*streams, key=lambda kr: kr[0]):
            if not fin.add(fidx, rec["text"], rec["source"], len(rec["text"].encode("utf-8"))):
                break
        splits = fin.close()
    except BaseException:
        fin.abort()
        raise
    finally:
        for s in streams:
            s.close()

    read_per_file: dict[int, Counter] = {}
    for m in parts:
        for i, c in m["read_per_file"].items():
            read_per_file.setdefault(int(i), Counter()).update(c)
    n_read = sum(m["documents_read"] for m in parts)
    pre_drops = merge_drops(*(m["dropped"] for m in parts))
    read_errors: Counter = Counter()
    masked: Counter = Counter()
    for m in parts:
        read_errors.update(m["read_errors"])
        masked.update(m["masked"])
    if fin.kept == 0:
        clear_outputs(out_dir)
        raise no_text_error(cfg, n_read, pre_drops, read_errors)

    # Rejected records: the parts' files, one after another in shard order.
    has_rejects = False
    for i in order:
        if parts[i].get("rejects_file"):
            with open(part_dirs[i] / parts[i]["rejects_file"], "rb") as src, \
                    open(out_dir / "rejects.jsonl", "ab") as dst:
                shutil.copyfileobj(src, dst)
            has_rejects = True
    manifest = build_manifest(cfg, files, fin, splits, n_read, read_per_file, pre_drops, dict(read_errors),
                              masked, has_rejects)
    write_manifest(out_dir, manifest)
    return manifest
