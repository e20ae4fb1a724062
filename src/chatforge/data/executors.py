"""Where the data stages run their expensive, pure per-batch work: `data.executor`.

local  this machine: a process pool for prepare (data.workers), threads for encode (the default).
ray    Ray tasks on a Ray cluster (`data.ray_address`, empty: a Ray instance started on this machine).

The output is byte-identical to the local executor:

- prepare (a single run): reading, the per-document work and the exact/near dedup group-bys run on the
  cluster, and only the ordered write pass stays in the driver: see ray_prepare.py.
- prepare of a part (--shard/--num-shards, for `merge`): batches of raw documents read by the driver (in
  canonical order) go to `_prepare_batch` tasks, which run the same `DocumentProcessor` as the local pool
  (clean, mask, filters, exact hash). The driver collects results in submission order.
- encode: each batch of documents is cut into runs tokenized by `_encode_run` tasks; the driver writes the
  runs in order with the same shard writer.

A task whose worker dies (process crash, node lost) is re-run by Ray up to `_RETRIES` times; the tasks are
pure, so a retry returns the same result. Ray is imported only here and in ray_prepare.py, only when
data.executor=ray.
"""
from __future__ import annotations

import os
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import UserError

EXECUTORS = ("local", "ray")
_RETRIES = 3  # Ray re-runs a task whose worker process or node died this many times
_CRASH_ENV = "CHATFORGE_RAY_CRASH_MARKER"  # test hook: the first task to see this file missing crashes its worker


def check_executor(name: str) -> str:
    if name not in EXECUTORS:
        raise UserError(f"data.executor={name!r}: choose one of {', '.join(EXECUTORS)}")
    return name


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("data.executor=ray needs Ray, which is not installed: pip install 'chatforge[ray]'") from None
    return ray


@contextmanager
def ray_session(address: str = ""):
    """Connect to the cluster at `address` (empty: start Ray on this machine), unless this process already
    did; disconnect afterwards only if this call connected."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, log_to_driver=True)
            else:
                ray.init(include_dashboard=False, log_to_driver=True)
        except (ConnectionError, ValueError) as e:
            raise UserError(f"cannot connect to the Ray cluster at {address or '(local)'}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _cluster_cpus(ray) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _maybe_crash(marker: str | None) -> None:
    """Test-only: simulate a worker lost mid-job (the file makes it happen once per job)."""
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


# ============================================================================================ prepare

_PROCESSORS: dict[str, Any] = {}  # per worker process: run id -> DocumentProcessor


def _prepare_batch(run_id: str, proc_box: list, raws: list[str], crash: str | None) -> list:
    """Ray task body: the local pool's per-batch work, with the processor built once per worker and run."""
    _maybe_crash(crash)
    proc = _PROCESSORS.get(run_id)
    if proc is None:
        import ray

        _PROCESSORS.clear()  # one run at a time per worker: do not keep old configs alive
        make, args = ray.get(proc_box[0])
        proc = _PROCESSORS[run_id] = make(*args)
    return [proc(r) for r in raws]


def ray_process_documents(cfg, batches: Iterator[list[tuple]], make_processor, signatures: bool,
                          ) -> Iterator[tuple]:
    """(item, make_processor(cfg, signatures)(item[2])) in input order, computed by Ray tasks; `batches` are
    the local pool's batches of items. At most 2 batches per cluster CPU are in flight (bounded memory)."""
    with ray_session(cfg.ray_address) as ray:
        task = ray.remote(max_retries=_RETRIES, retry_exceptions=False)(_prepare_batch)
        proc_box = [ray.put((make_processor, (cfg, signatures)))]  # in a list: fetched once per worker
        run_id = uuid.uuid4().hex
        limit = 2 * _cluster_cpus(ray)
        crash = os.environ.get(_CRASH_ENV) or None
        pending: deque = deque()
        try:
            for batch in batches:
                pending.append((batch, task.remote(run_id, proc_box, [it[2] for it in batch], crash)))
                while len(pending) > limit:
                    b, ref = pending.popleft()
                    yield from zip(b, ray.get(ref))
            while pending:
                b, ref = pending.popleft()
                yield from zip(b, ray.get(ref))
        finally:  # also when the caller stops early (max_docs)
            for _, ref in pending:
                ray.cancel(ref)


# ============================================================================================ encode

_TOKENIZERS: dict[str, Any] = {}  # per worker process: run id -> Tokenizer


def _encode_run(run_id: str, tok_box: list, texts: list[str], crash: str | None):
    _maybe_crash(crash)
    tok = _TOKENIZERS.get(run_id)
    if tok is None:
        import ray

        _TOKENIZERS.clear()
        tok = _TOKENIZERS[run_id] = ray.get(tok_box[0])
    return tok.encode_documents(texts, threads=1)


class _Ref:
    """A Ray object reference that answers .result() like a concurrent.futures.Future (for shards._drain)."""

    def __init__(self, ray, ref) -> None:
        self.ray, self.ref = ray, ref

    def result(self):
        return self.ray.get(self.ref)


class RayEncoder:
    """Submits runs of documents to Ray tasks; used by shards.write_shards inside `ray_session`.

    The tokenizer is shipped after the driver ran verify_fast on it, so workers use the same encoder."""

    RUN_CHARS = 1 << 20  # about 1 MB of text per task

    def __init__(self, ray, tok) -> None:
        self.ray = ray
        self.task = ray.remote(max_retries=_RETRIES, retry_exceptions=False)(_encode_run)
        self.tok_box: list | None = None
        self.tok = tok
        self.run_id = uuid.uuid4().hex
        self.cpus = _cluster_cpus(ray)
        self.crash = os.environ.get(_CRASH_ENV) or None

    def max_pending(self, runs_per_batch: int) -> int:
        return max(1, (2 * self.cpus) // max(runs_per_batch, 1))

    def submit(self, runs: list[list[str]]) -> list[_Ref]:
        if self.tok_box is None:
            self.tok_box = [self.ray.put(self.tok)]
        return [_Ref(self.ray, self.task.remote(self.run_id, self.tok_box, run, self.crash)) for run in runs]
