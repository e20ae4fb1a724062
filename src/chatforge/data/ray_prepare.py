"""`chatforge prepare ... data.executor=ray`: reading, per-document work and deduplication on the cluster;
only the ordered write pass stays in the driver. The output is byte-identical to the local executor.

1. Map: one Ray task per input file (`_prepare_file`). Input files must be on a filesystem every node can
   read (the same paths everywhere: NFS, a shared mount, or a copy on each node). The task reads the file
   with the same reader as the local path (`InputFile.records`), runs the same `DocumentProcessor` on every
   record, and returns three objects: the records' results for the write pass (kept in the object store
   until the driver reaches that file), a table (order key, exact key) of the documents that passed the
   filters, and, with near-dedup on, a table (order key, band, band key) with the document's LSH band keys.
   The order key is o = file index << 40 | record number: canonical order is integer order.
2. Exact dedup: a distributed group-by of the first table on the exact key (a hash shuffle in Ray Data);
   every member but the smallest order key is a duplicate. Shuffled: 16 bytes per document.
3. Near dedup: the band rows of the documents that survived 2 (b rows per document, each 8*r bytes of
   MinHash values, with the b and r datasketch's MinHashLSH picks) are grouped by (band, band key); every
   bucket with 2 or more members sends its members back, labelled by the bucket. The driver then resolves
   them in canonical order (`resolve_near`): a document is a near-duplicate iff one of its buckets already
   holds a kept document. That is exactly MinHashLSH's query-then-insert over the documents in order (a query
   matches any earlier kept document that shares a band key), with work linear in bucket sizes (no pairs).
4. Write pass (driver): results are fetched file by file in canonical order, read problems are replayed into
   the run's ReadStats at the position where the local reader would meet them, and every filter-passing
   document goes to the same `Finisher` with its precomputed verdict, so split, weights, the held-back val
   document, max_docs/max_bytes and the manifest are one code path for both executors. A verdict depends only
   on earlier documents, so verdicts computed over the whole input and applied up to a stop are the same as
   the sequential ones.

Retries: a map task whose worker dies is re-run (`max_retries=3`); Ray Data re-runs its tasks on a lost
worker by default (max_retries=-1) and its hash-shuffle aggregators are restartable actors. Every step is a
pure function of its inputs, so a retry gives the same result. Why plain tasks for the map and not Ray Data: each file gives two outputs with
different consumers (bulky results that the driver reads back file by file in canonical order, small key
rows for the shuffles), and a per-file task keeps a file's read problems in one ordered log.
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from .executors import _CRASH_ENV, _RETRIES, _cluster_cpus, _maybe_crash, ray_session
from .sources import ReadStats

_SHIFT = 40  # order key = file index << _SHIFT | record number (2^40 records per file, 2^23 files)
LAST_RUN: dict[str, float] = {}  # seconds per phase of the last run in this process (for benchmarks/bench_ray.py)


def lsh_shape(threshold: float, num_perm: int) -> tuple[int, int]:
    """(b, r): the bands and rows per band that datasketch's MinHashLSH picks for these settings."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def band_keys(sigs: np.ndarray, b: int, r: int) -> np.ndarray:
    """(b, n, r*8)-byte view of n signatures' band keys: key [i, j] is signature j's values i*r..(i+1)*r."""
    n = len(sigs)
    return np.ascontiguousarray(np.asarray(sigs, dtype=np.uint64)[:, :b * r].reshape(n, b, r).transpose(1, 0, 2))


def near_buckets(orders: list[int], sigs: np.ndarray, b: int, r: int) -> list[tuple[int, tuple]]:
    """Pure-Python form of step 3's group-by (for tests): (order key, bucket) for buckets with >= 2 members."""
    keys = band_keys(sigs, b, r)
    groups: dict[tuple, list[int]] = {}
    for i in range(b):
        for j, o in enumerate(orders):
            groups.setdefault((i, keys[i, j].tobytes()), []).append(o)
    return [(o, (min(m), i)) for (i, _), m in groups.items() if len(m) >= 2 for o in m]


def resolve_near(rows) -> np.ndarray:
    """Order keys that are near-duplicates, sorted, from (order key, bucket) rows of the multi-member buckets:
    in canonical order, a document is a near-duplicate iff one of its buckets holds an earlier kept document."""
    buckets: dict[int, list] = {}
    for o, bucket in rows:
        buckets.setdefault(int(o), []).append(bucket)
    holds_kept: set = set()
    near = []
    for o in sorted(buckets):
        if any(bk in holds_kept for bk in buckets[o]):
            near.append(o)
        else:
            holds_kept.update(buckets[o])
    return np.array(near, dtype=np.int64)


class _Counts(Counter):
    """ReadStats.counts in a worker: every change is logged at the reader's position."""

    def __init__(self, log: _ReadLog) -> None:
        super().__init__()
        self._log = log

    def __setitem__(self, key, value) -> None:
        self._log.events.append((self._log.at, "count", (key, value - self[key])))
        super().__setitem__(key, value)


class _ReadLog(ReadStats):
    """A ReadStats that records what the reader met and where (before record `at`), to replay in the driver."""

    def __init__(self, strict: bool) -> None:
        super().__init__(strict=strict)
        self.at = 0
        self.events: list[tuple[int, str, tuple]] = []
        self.counts = _Counts(self)

    def note(self, reason: str, path, message: str = "") -> None:
        self.events.append((self.at, "note", (reason, str(path), message)))

    def reject(self, reason: str, path, line: int, raw: str, message: str = "") -> None:
        self.events.append((self.at, "reject", (reason, str(path), line, raw[:500], message)))


def _replay(stats: ReadStats, event: tuple) -> None:
    _, kind, args = event
    if kind == "count":
        stats.counts[args[0]] += args[1]
    elif kind == "note":
        stats.note(*args)
    else:
        stats.reject(*args)


# ============================================================================================ tasks

_PROCESSORS: dict[str, Any] = {}  # per worker process: run id -> DocumentProcessor


def _prepare_file(run_id: str, proc_box: list, f, text_field: str, strict: bool, shape: tuple | None,
                  crash: str | None):
    """Ray task: read one file, process every record. -> (results, exact-key table, band table or None)."""
    import pyarrow as pa

    _maybe_crash(crash)
    proc = _PROCESSORS.get(run_id)
    if proc is None:
        import ray

        _PROCESSORS.clear()
        make, args = ray.get(proc_box[0])
        proc = _PROCESSORS[run_id] = make(*args)
    log = _ReadLog(strict)
    records, orders, keys, sigs = [], [], [], []
    error = None
    base = f.index << _SHIFT
    try:
        for k, (raw, source) in enumerate(f.records(text_field, log)):
            log.at = k + 1  # what the reader meets from here on comes before record k + 1
            res = proc(raw)
            if res.text is not None:
                orders.append(base | k)
                keys.append(res.key)
                sigs.append(res.signature)
            res.signature = None  # only the band keys travel
            records.append((len(raw), source, res))
    except UserError as e:  # e.g. --strict and a record without the field: the run stops right there
        error = str(e)
    o = np.array(orders, dtype=np.int64)
    table = pa.table({"o": o, "key": np.array(keys, dtype=np.uint64)})
    bands = None
    if shape is not None:
        b, r = shape
        h = band_keys(np.array(sigs, dtype=np.uint64).reshape(len(sigs), -1), b, r) if sigs else b""
        bands = pa.table({
            "o": np.tile(o, b), "band": np.repeat(np.arange(b, dtype=np.int16), len(o)),
            "h": pa.FixedSizeBinaryArray.from_buffers(pa.binary(8 * r), b * len(o), [None, pa.py_buffer(h)]),
        })
    return {"records": records, "events": log.events, "error": error}, table, bands


def _exact_dups(df):
    """Per hash partition of (o, key): the rows that are not the first (smallest o) of their key."""
    return df.loc[df["o"] != df.groupby("key")["o"].transform("min"), ["o"]]


def _drop_rows(df, drop: np.ndarray):
    return df.loc[~np.isin(df["o"].to_numpy(), drop)]


def _bucket_members(df):
    """Per hash partition of (o, band, h): members of buckets with >= 2 documents, labelled (smallest o, band)."""
    g = df.groupby(["band", "h"])["o"]
    multi = (g.transform("size") >= 2).to_numpy()
    return {"o": df["o"].to_numpy()[multi], "first": g.transform("min").to_numpy()[multi],
            "band": df["band"].to_numpy()[multi]}


# ============================================================================================ driver


def _group(ray, refs: list, fn, parts: int, keys: list[str], drop: np.ndarray | None = None) -> dict:
    """Ray Data: the tables in `refs` (minus rows whose o is in `drop`), hash-shuffled on `keys` into `parts`
    partitions, `fn` applied to each whole partition. This is GroupedData.map_groups (which in Ray 2.60 is
    repartition(keys) + map_batches(batch_size=None)) with the per-group loop done by pandas: map_groups calls
    Python once per group, about 45 us per document here."""
    import ray.data

    ds = ray.data.from_arrow_refs(refs)
    if ds.count() == 0:
        return {}
    if drop is not None and len(drop):
        ds = ds.map_batches(_drop_rows, batch_format="pandas", fn_kwargs={"drop": drop})
    out = ds.repartition(parts, keys=keys).map_batches(fn, batch_size=None, batch_format="pandas")
    cols: dict[str, list] = {}
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            cols.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in cols.items()}


class _Marks:
    """Membership test for increasing order keys against a sorted array (a cursor, no set)."""

    def __init__(self, sorted_keys: np.ndarray) -> None:
        self.a, self.i = sorted_keys, 0

    def __contains__(self, o: int) -> bool:
        a, i = self.a, self.i
        while i < len(a) and a[i] < o:
            i += 1
        self.i = i
        return i < len(a) and a[i] == o


def ray_prepare_documents(cfg, files: list, stats: ReadStats, make_processor) -> Iterator[tuple]:
    """((file index, record number, raw length, source), Processed, verdict) in canonical order, with every
    read problem replayed into `stats` where the local reader would meet it. verdict: "keep", "duplicate" or
    "near_duplicate" for documents that passed the filters (see the module doc)."""
    with ray_session(cfg.ray_address) as ray:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
        shape = lsh_shape(cfg.near_dedup_threshold, cfg.near_dedup_num_perm) if cfg.near_dedup else None
        task = ray.remote(max_retries=_RETRIES, retry_exceptions=False, num_returns=3)(_prepare_file)
        box = [ray.put((make_processor, (cfg, cfg.near_dedup)))]
        run_id, crash = uuid.uuid4().hex, os.environ.get(_CRASH_ENV) or None
        t0 = time.perf_counter()
        outs = [task.remote(run_id, box, f, cfg.text_field, cfg.strict, shape, crash) for f in files]
        results = [o[0] for o in outs]
        try:
            waiting = [o[1] for o in outs]
            with tqdm(total=len(files), desc="prepare: read+clean (files)", disable=not sys.stderr.isatty()) as bar:
                while waiting:
                    done, waiting = ray.wait(waiting, num_returns=1)
                    bar.update(len(done))
            t1 = time.perf_counter()
            parts = _cluster_cpus(ray)
            dups = np.sort(_group(ray, [o[1] for o in outs], _exact_dups, parts, ["key"]).get("o", np.empty(0, np.int64)))
            t2 = time.perf_counter()
            near = np.empty(0, np.int64)
            if shape is not None:
                m = _group(ray, [o[2] for o in outs], _bucket_members, parts, ["band", "h"], drop=dups)
                if m:
                    near = resolve_near(zip(m["o"], zip(m["first"].tolist(), m["band"].tolist())))
            del outs
            t3 = time.perf_counter()
            LAST_RUN.clear()
            LAST_RUN.update(map_s=t1 - t0, exact_s=t2 - t1, near_s=t3 - t2)
            is_dup, is_near = _Marks(dups), _Marks(near)
            for i, f in enumerate(files):
                ray.wait(results[i + 1:i + 3], num_returns=len(results[i + 1:i + 3]), timeout=0, fetch_local=True)
                out = ray.get(results[i])
                results[i] = None  # the object store may free it
                events = out["events"]
                e = 0
                base = f.index << _SHIFT
                for k, (nchars, source, res) in enumerate(out["records"]):
                    while e < len(events) and events[e][0] <= k:
                        _replay(stats, events[e])
                        e += 1
                    verdict = None
                    if res.text is not None:
                        o = base | k
                        verdict = "duplicate" if o in is_dup else "near_duplicate" if o in is_near else "keep"
                    yield (f.index, k, nchars, source), res, verdict
                for ev in events[e:]:
                    _replay(stats, ev)
                if out["error"] is not None:
                    raise UserError(out["error"])
            LAST_RUN["write_s"] = time.perf_counter() - t3  # the ordered pass (Finisher included), not close()
        finally:  # also when the caller stops early (max_docs)
            for ref in results:
                if ref is not None:
                    ray.cancel(ref)
