"""The pretraining corpus (`prepare_corpus`): raw inputs -> cleaned, filtered, deduplicated, split,
zstd-compressed JSONL shards + manifest, in two halves:

1. Per document (a pure function of the raw text, so it runs in a process pool when data.workers > 1):
   clean (clean.py), optionally mask e-mail/IP addresses, drop by length and by the quality rules
   (quality.py), and hash (exact-dedup key, MinHash signature when near-dedup is on).
2. In document order, in one process (`Finisher`): drop exact and near duplicates (the first copy wins),
   assign each document to train/val by a salted hash of its text, apply the mixing weights to train
   documents, and write shards.

Document order is canonical: (input file index, record number in that file), files in data.inputs order.
The pool returns results in that order (ordered map over batches), so the output is byte-identical for any
number of workers. Sharded runs (`shard_index`/`num_shards`, see merge.py) write their surviving documents
with that key; merging the parts is a k-way merge by key fed to the same `Finisher`, which is why a merge
equals a single run byte for byte.

Memory stays bounded: per document only a 64-bit hash (and, with near-dedup, MinHash bands) is kept;
upsampled copies wait in a temporary file on disk.

Validation never ends up empty when there are two or more documents: if the hash split puts nothing in val, the
train document with the smallest split hash is moved there, so evaluation downstream always has data.

data.executor=ray runs reading, the per-document half and the dedup decisions on a Ray cluster and feeds
the results, with their verdicts, to the same `Finisher` (ray_prepare.py).

The shard and manifest format is in documents.py; the fine-tuning set is prepared by chat.py.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import sys
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard
from tqdm import tqdm

from ..config import DataConfig
from ..errors import UserError
from .clean import transform
from .dedup import ExactDedup, NearDedup, dedup_hash, split_fraction
from .documents import (CORPUS_FORMAT, PART_FORMAT, PART_PREFIX, SPLITS, DocumentWriter, clear_outputs,
                        read_jsonl_zst, write_manifest)
from .executors import check_executor
from .quality import QualityFilter, mask_pii
from .sources import ReadStats, expand_inputs_indexed, iter_records
from .stdlib_corpus import iter_stdlib_documents, stdlib_root

_BATCH_DOCS, _BATCH_CHARS = 512, 4 << 20  # a unit of work sent to a worker process


# ============================================================================================ inputs


@dataclass(frozen=True)
class InputFile:
    """One unit of reading: a file (or save_to_disk folder, or Hub name), or the stdlib corpus."""

    index: int  # position in the expanded input list: the first half of every document's order key
    label: str  # the manifest's per-source name
    input_index: int  # which data.inputs entry it came from (the data.weights entry that applies)
    path: str | None  # None: the Python standard library
    size: int  # bytes on disk (for balancing files across shards); 0 when unknown

    def records(self, text_field: str, stats: ReadStats) -> Iterator[tuple[str, str]]:
        """(raw text, per-document source) in file order."""
        if self.path is None:
            for doc in iter_stdlib_documents():
                yield doc["text"], doc["source"]
            return
        for text, _, line in iter_records(Path(self.path), text_field, stats):
            yield text, f"{self.path}:{line}"


def plan_inputs(cfg: DataConfig) -> list[InputFile]:
    """The expanded, ordered input list; the same on every machine that sees the same files."""
    if not cfg.inputs:
        return [InputFile(0, f"python-stdlib:{stdlib_root()}", 0, None, 0)]
    if cfg.weights and len(cfg.weights) != len(cfg.inputs):
        raise UserError(f"data.weights has {len(cfg.weights)} entries but data.inputs has {len(cfg.inputs)}; "
                        f"give one weight per input (or none)")
    if any(w < 0 for w in cfg.weights):
        raise UserError(f"data.weights must be >= 0 (0 drops an input's train documents); got {cfg.weights}")
    out = []
    for i, (idx, path) in enumerate(expand_inputs_indexed(cfg.inputs)):
        try:
            size = path.stat().st_size if path.is_file() else 0
        except OSError:
            size = 0
        out.append(InputFile(i, str(path), idx, str(path), size))
    return out


def assign_files(files: list[InputFile], num_shards: int) -> list[int] | None:
    """Which shard reads each file, or None to partition by document instead (fewer files than shards).

    Greedy by size (largest file to the least-loaded shard, ties to the lower index): balanced and the same
    on every machine, because it depends only on the file list and sizes."""
    if num_shards <= 1:
        return [0] * len(files)
    if len(files) < num_shards:
        return None
    load = [0] * num_shards
    owner = [0] * len(files)
    for f in sorted(files, key=lambda f: (-f.size, f.index)):
        s = min(range(num_shards), key=lambda k: (load[k], k))
        owner[f.index] = s
        load[s] += max(f.size, 1)
    return owner


def _iter_raw(cfg: DataConfig, files: list[InputFile], stats: ReadStats, shard_index: int,
              num_shards: int) -> Iterator[tuple[int, int, str, str]]:
    """(file index, record number, raw text, source) of the documents this shard owns, in canonical order.

    By-document partitioning: every shard reads every file and keeps record k when k % num_shards equals
    its index; read problems are then counted by shard 0 only, so a merge does not count them n times."""
    owner = assign_files(files, num_shards)
    quiet = ReadStats(strict=cfg.strict)
    for f in files:
        if owner is not None and owner[f.index] != shard_index:
            continue
        fstats = stats if owner is not None or shard_index == 0 else quiet
        for k, (raw, source) in enumerate(f.records(cfg.text_field, fstats)):
            if owner is None and k % num_shards != shard_index:
                continue
            yield f.index, k, raw, source


# ============================================================================================ per document


@dataclass
class Processed:
    """What the per-document half sends back: the cleaned text, or why it was dropped."""

    text: str | None
    reason: str | None
    nbytes: int
    emails: int = 0
    ips: int = 0
    key: int = 0  # exact-dedup hash
    signature: Any = None  # MinHash hash values (near-dedup on)


class DocumentProcessor:
    """clean -> mask -> length/quality filters -> hashes. Pure per document; one per process."""

    def __init__(self, cfg: DataConfig, signatures: bool) -> None:
        self.cfg = cfg
        self.quality = QualityFilter(cfg)
        self.near = NearDedup(cfg.near_dedup_threshold, cfg.near_dedup_num_perm, cfg.near_dedup_ngram) \
            if signatures else None

    def __call__(self, raw: str) -> Processed:
        c = self.cfg
        text = transform(raw, c.lowercase, c.remove_stopwords)
        emails = ips = 0
        if c.mask_pii and text:
            text, emails, ips = mask_pii(text)
        nchars = len(text)
        if nchars == 0:
            return Processed(None, "empty", len(raw.encode("utf-8", errors="replace")))
        nbytes = len(text.encode("utf-8"))
        if nchars < c.min_chars:
            return Processed(None, "too_short", nbytes)
        if c.max_chars and nchars > c.max_chars:
            return Processed(None, "too_long", nbytes)
        reason = self.quality.check(text)
        if reason:
            return Processed(None, reason, nbytes)
        sig = self.near.signature(text) if self.near is not None else None
        return Processed(text, None, nbytes, emails, ips, dedup_hash(text), sig)


_WORKER: DocumentProcessor | None = None


def _worker_init(cfg: DataConfig, signatures: bool) -> None:
    global _WORKER
    _WORKER = DocumentProcessor(cfg, signatures)


def _worker_batch(raws: list[str]) -> list[Processed]:
    return [_WORKER(r) for r in raws]


def _batches(items: Iterator[tuple], batch_docs: int, batch_chars: int) -> Iterator[list[tuple]]:
    batch: list[tuple] = []
    chars = 0
    for item in items:
        batch.append(item)
        chars += len(item[2])
        if len(batch) >= batch_docs or chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def process_documents(cfg: DataConfig, items: Iterator[tuple[int, int, str, str]], signatures: bool,
                      ) -> Iterator[tuple[tuple[int, int, str, str], Processed]]:
    """(item, result) in input order. workers > 1: batches go to a process pool with a bounded number in
    flight (Pool.imap would read the whole input ahead into memory), collected in submission order.
    data.executor=ray: the same batches go to Ray tasks instead (executors.py); only a part (--shard) comes
    here with Ray, a single run reads and deduplicates on the cluster (ray_prepare.py)."""
    if check_executor(cfg.executor) == "ray":  # Ray tasks over the same batches (see executors.py)
        from .executors import ray_process_documents
        yield from ray_process_documents(cfg, _batches(items, _BATCH_DOCS, _BATCH_CHARS), DocumentProcessor,
                                         signatures)
        return
    if cfg.workers <= 1:
        proc = DocumentProcessor(cfg, signatures)
        for item in items:
            yield item, proc(item[2])
        return
    # Not "fork": the parent may already run torch/tokenizers threads, and a forked child can inherit a held
    # lock and hang (seen in the test suite). forkserver forks from a clean single-threaded server.
    # ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies raises BrokenProcessPool here instead
    # of leaving its task unanswered forever, and shutdown cannot deadlock on a queue lock as Pool.terminate can.
    ctx = multiprocessing.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")
    pool = ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_worker_init, initargs=(cfg, signatures))
    try:
        pending: deque = deque()
        for batch in _batches(items, _BATCH_DOCS, _BATCH_CHARS):
            pending.append((batch, pool.submit(_worker_batch, [it[2] for it in batch])))
            while len(pending) > 2 * cfg.workers:
                b, fut = pending.popleft()
                yield from zip(b, fut.result())
        while pending:
            b, fut = pending.popleft()
            yield from zip(b, fut.result())
    finally:  # also when the caller stops early (max_docs): drop queued batches, wait for running ones
        pool.shutdown(wait=True, cancel_futures=True)


def _with_lengths(items: Iterator[tuple]) -> Iterator[tuple]:
    """process_documents' items in the shape the Ray path yields: ((file, record, raw length, source), result,
    verdict None: the Finisher decides)."""
    try:
        for (fidx, k, raw, source), res in items:
            yield (fidx, k, len(raw), source), res, None
    finally:
        items.close()


# ============================================================================================ finishing


class Finisher:
    """Second half (see module doc): dedup, split, weights, limits, writing. Fed documents in canonical order."""

    def __init__(self, cfg: DataConfig, out_dir: Path, files: list[InputFile]) -> None:
        self.cfg, self.out_dir, self.files = cfg, out_dir, files
        self.exact = ExactDedup()
        self.near = NearDedup(cfg.near_dedup_threshold, cfg.near_dedup_num_perm, cfg.near_dedup_ngram) \
            if cfg.near_dedup else None
        self.writers = {s: DocumentWriter(out_dir, s) for s in SPLITS}
        self.drops: dict[str, dict[str, int]] = {}
        self.kept = self.kept_bytes = 0
        self.stopped_by: str | None = None
        self.per_file = {f.index: Counter() for f in files}
        n_inputs = max(len(cfg.inputs), 1)
        self.weights = list(cfg.weights) or [1.0] * n_inputs
        self.mix = [Counter() for _ in range(n_inputs)]
        # The train document with the smallest split hash, held back until val has a document: if val is
        # still empty at the end, it goes there instead (see module doc).
        self.held: tuple[float, str, str, int, int] | None = None
        self.val_forced = False
        # Extra copies of upsampled train documents, written after the first pass so that copies of a
        # document are a whole corpus apart rather than adjacent.
        self._spill_path = out_dir / ".upsample.jsonl.zst.tmp"
        self._spill = None
        self._max_extra = 0

    def drop(self, reason: str, nbytes: int, n: int = 1) -> None:
        d = self.drops.setdefault(reason, {"documents": 0, "bytes": 0})
        d["documents"] += n
        d["bytes"] += nbytes

    def add(self, file_index: int, text: str, source: str, nbytes: int, key: int | None = None,
            signature: Any = None, verdict: str | None = None) -> bool:
        """Offer one document that passed the per-document filters. False: a limit was reached, stop.

        verdict: the dedup decision made elsewhere ("keep", "duplicate", "near_duplicate": the Ray executor's
        group-bys, see ray_prepare.py); None: decide here, in order."""
        if verdict is None:
            verdict = self._dedup(text, key, signature)
        if verdict != "keep":
            self.drop(verdict, nbytes)
            return True
        self.kept += 1
        self.kept_bytes += nbytes
        counts = self.per_file[file_index]
        counts["documents_kept"] += 1
        counts["bytes_kept"] += nbytes
        input_index = self.files[file_index].input_index
        self.mix[input_index]["documents_kept"] += 1
        u = split_fraction(text, self.cfg.split_salt)
        if u < self.cfg.val_fraction:
            self._val(text, source, nbytes, input_index)
            if self.held is not None:  # val has data now: nothing needs holding back any more
                self._train(*self.held[1:])
                self.held = None
        elif self.writers["val"].documents == 0 and (self.held is None or u < self.held[0]):
            if self.held is not None:
                self._train(*self.held[1:])
            self.held = (u, text, source, nbytes, input_index)
        else:
            self._train(text, source, nbytes, input_index)
        if self.cfg.max_docs and self.kept >= self.cfg.max_docs:
            self.stopped_by = "max_docs"
        elif self.cfg.max_bytes and self.kept_bytes >= self.cfg.max_bytes:
            self.stopped_by = "max_bytes"
        return self.stopped_by is None

    def _dedup(self, text: str, key: int | None, signature: Any) -> str:
        if self.exact.is_duplicate_hash(dedup_hash(text) if key is None else key):
            return "duplicate"
        if self.near is not None:
            sig = self.near.signature(text) if signature is None else signature
            if self.near.is_duplicate_signature(sig):
                return "near_duplicate"
        return "keep"

    def _val(self, text: str, source: str, nbytes: int, input_index: int) -> None:
        self.writers["val"].write(text, source, nbytes)
        self.mix[input_index]["val_documents"] += 1

    def _train(self, text: str, source: str, nbytes: int, input_index: int) -> None:
        w = self.weights[input_index]
        copies = int(w)
        if w != copies:  # the fractional part: a deterministic share of documents, chosen by hash
            copies += split_fraction(text, self.cfg.split_salt + "\0weight") < w - int(w)
        mix = self.mix[input_index]
        if copies == 0:
            self.drop("downsampled", nbytes)
            mix["train_downsampled"] += 1
            return
        self.writers["train"].write(text, source, nbytes)
        mix["train_documents"] += copies
        mix["train_bytes"] += nbytes * copies
        if copies > 1:
            if self._spill is None:
                self._spill = zstandard.ZstdCompressor(level=1).stream_writer(open(self._spill_path, "wb"))
            rec = {"n": copies - 1, "text": text, "source": source, "nbytes": nbytes}
            self._spill.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
            self._max_extra = max(self._max_extra, copies - 1)

    def close(self) -> dict:
        if self.held is not None:
            if self.kept >= 2 and self.writers["val"].documents == 0:
                self._val(*self.held[1:])
                self.val_forced = True
            else:
                self._train(*self.held[1:])
            self.held = None
        if self._spill is not None:
            self._spill.close()
            for k in range(1, self._max_extra + 1):  # pass k writes every document with >= k extra copies
                for rec in read_jsonl_zst(self._spill_path):
                    if rec["n"] >= k:
                        self.writers["train"].write(rec["text"], rec["source"], rec["nbytes"])
            self._spill_path.unlink()
        return {s: w.close() for s, w in self.writers.items()}

    def abort(self) -> None:
        for w in self.writers.values():
            try:
                w.close()
            except Exception:  # best effort: the caller clears the outputs and reports the real error
                pass
        if self._spill is not None:
            self._spill.close()
        self._spill_path.unlink(missing_ok=True)


class _Tally:
    """What the per-document half observed: read counts, drops, masks."""

    def __init__(self, files: list[InputFile]) -> None:
        self.read = 0
        self.per_file = {f.index: Counter() for f in files}
        self.drops: dict[str, dict[str, int]] = {}
        self.masked = Counter()

    def drop(self, reason: str, nbytes: int, n: int = 1) -> None:
        d = self.drops.setdefault(reason, {"documents": 0, "bytes": 0})
        d["documents"] += n
        d["bytes"] += nbytes

    def see(self, file_index: int, res: Processed) -> None:
        self.read += 1
        self.per_file[file_index]["documents_read"] += 1
        if res.reason:
            self.drop(res.reason, res.nbytes)
        self.masked["emails"] += res.emails
        self.masked["ips"] += res.ips


def merge_drops(*many: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for drops in many:
        for reason, d in drops.items():
            o = out.setdefault(reason, {"documents": 0, "bytes": 0})
            o["documents"] += d["documents"]
            o["bytes"] += d["bytes"]
    return dict(sorted(out.items()))


def no_text_error(cfg: DataConfig, n_read: int, drops: dict, read_errors: dict) -> UserError:
    inputs_label = ", ".join(cfg.inputs) if cfg.inputs else "the Python standard library"
    reasons = {**{k: v["documents"] for k, v in drops.items()}, **read_errors}
    why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "no documents found"
    return UserError(f"no usable text in {inputs_label}: {n_read} documents read, all dropped ({why}); "
                     f"check the files and data.min_chars/max_chars/text_field/quality filters")


def build_manifest(cfg: DataConfig, files: list[InputFile], fin: Finisher, splits: dict, n_read: int,
                   read_per_file: dict[int, Counter], pre_drops: dict, read_errors: dict, masked: Counter,
                   has_rejects: bool) -> dict:
    """The corpus manifest (shared by a single run and a merge, so the two agree field for field)."""
    sources = []
    for f in files:
        c = Counter(read_per_file.get(f.index, {}))
        c.update(fin.per_file[f.index])
        sources.append({"path": f.label, **{k: c.get(k, 0) for k in ("bytes_kept", "documents_kept",
                                                                      "documents_read")}})
    mix = []
    for i, counts in enumerate(fin.mix):
        mix.append({"input": cfg.inputs[i] if cfg.inputs else "<python-stdlib>", "weight": fin.weights[i],
                    **{k: counts.get(k, 0) for k in ("documents_kept", "val_documents", "train_documents",
                                                     "train_bytes", "train_downsampled")}})
    return {
        "format": CORPUS_FORMAT,
        "inputs": list(cfg.inputs) or ["<python-stdlib>"],
        "sources": sources,
        "mix": mix,
        "documents_read": n_read,
        "documents_kept": fin.kept,
        "splits": splits,
        "val_forced": fin.val_forced,
        "dropped": merge_drops(pre_drops, fin.drops),
        "read_errors": dict(sorted(read_errors.items())),
        "masked": {k: masked.get(k, 0) for k in ("emails", "ips")} if cfg.mask_pii else None,
        "rejects_file": "rejects.jsonl" if has_rejects else None,
        "stopped_by": fin.stopped_by,
        "config": dataclasses.asdict(cfg),
    }


def _progress_bar(files: list[InputFile], desc: str):
    """Bytes-based bar (MB/s) with a documents/s postfix; total known when the inputs are plain files."""
    total = sum(f.size for f in files) or None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not sys.stderr.isatty(),
                smoothing=0.1, mininterval=0.5)


def prepare_corpus(cfg: DataConfig, out_dir: Path, shard_index: int | None = None, num_shards: int = 1) -> dict:
    """Build the pretraining corpus in out_dir; returns (and writes) the manifest. See the module doc.

    With num_shards > 1, prepares only part `shard_index` of the inputs (files spread over shards, or every
    num_shards-th document when there are fewer files than shards) into out_dir as a *part*: filtered and
    exact-deduplicated documents with their order keys, not yet split. Join the parts with
    `chatforge.data.merge.merge_parts`."""
    out_dir = Path(out_dir)
    if num_shards < 1 or (num_shards > 1 and shard_index is None) or \
            (shard_index is not None and not 0 <= shard_index < num_shards):
        raise UserError(f"--shard {shard_index} --num-shards {num_shards}: need 0 <= shard < num-shards")
    part = num_shards > 1
    shard_index = shard_index or 0
    files = plan_inputs(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_outputs(out_dir)
    stats = ReadStats(rejects_path=out_dir / "rejects.jsonl", strict=cfg.strict)
    tally = _Tally(files)
    fin = None if part else Finisher(cfg, out_dir, files)
    part_writer = DocumentWriter(out_dir, PART_PREFIX) if part else None
    part_dedup = ExactDedup()
    # Near-duplicate signatures are computed by the workers in a single run; a part leaves near-dedup to
    # the merge, which has to see every part. data.executor=ray (single run): reading and dedup run on the
    # cluster too, and documents arrive with their dedup verdicts (ray_prepare.py); a part uses Ray only for
    # the per-document work (process_documents).
    if not part and check_executor(cfg.executor) == "ray":
        from .ray_prepare import ray_prepare_documents
        items = ray_prepare_documents(cfg, files, stats, DocumentProcessor)
    else:
        items = _with_lengths(process_documents(cfg, _iter_raw(cfg, files, stats, shard_index, num_shards),
                                                signatures=cfg.near_dedup and not part))
    bar = _progress_bar(files, "prepare" if not part else f"prepare part {shard_index}/{num_shards}")
    try:
        for (fidx, k, nchars, source), res, verdict in items:
            tally.see(fidx, res)
            bar.update(nchars)
            if tally.read % 1000 == 0:
                bar.set_postfix(docs=tally.read, refresh=False)
            if res.text is None:
                continue
            if part:
                if part_dedup.is_duplicate_hash(res.key):
                    tally.drop("duplicate", res.nbytes)
                    continue
                part_writer.write_record({"k": [fidx, k], "text": res.text, "source": source}, res.nbytes)
            elif not fin.add(fidx, res.text, source, res.nbytes, res.key, res.signature, verdict):
                break
    except BaseException:
        if fin is not None:
            fin.abort()
        raise
    finally:
        items.close()
        stats.close()
        bar.close()

    if part:
        written = part_writer.close()
        manifest = {
            "format": PART_FORMAT, "shard_index": shard_index, "num_shards": num_shards,
            "files": [dataclasses.asdict(f) for f in files],
            "documents_read": tally.read, "documents_written": written["documents"],
            "read_per_file": {str(i): dict(c) for i, c in tally.per_file.items() if c},
            "dropped": dict(sorted(tally.drops.items())), "read_errors": dict(sorted(stats.counts.items())),
            "masked": dict(tally.masked), "part": written,
            "rejects_file": "rejects.jsonl" if (out_dir / "rejects.jsonl").exists() else None,
            "config": dataclasses.asdict(cfg),
        }
        write_manifest(out_dir, manifest)
        return manifest

    splits = fin.close()
    if fin.kept == 0:
        clear_outputs(out_dir)
        raise no_text_error(cfg, tally.read, tally.drops, stats.counts)
    manifest = build_manifest(cfg, files, fin, splits, tally.read, tally.per_file, tally.drops, stats.counts,
                              tally.masked, (out_dir / "rejects.jsonl").exists())
    write_manifest(out_dir, manifest)
    return manifest
