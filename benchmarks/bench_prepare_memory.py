"""Bounded memory: `prepare` over a ~2 GB input must peak under 1.5 GB RSS.

The input is real English text (the TinyStories and Shakespeare files in shared/data, never shared/data/heldout)
repeated until it reaches --size-gb, each copy of a document prefixed with a counter line so that every
document is unique and exact dedup has to remember all of them. prepare runs in a child process; its peak RSS
is the children's ru_maxrss.

    python benchmarks/bench_prepare_memory.py [--size-gb 2] [--workers 1] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def source_documents() -> list[str]:
    from chatforge.data.sources import iter_records

    files = sorted((DATA / "tinystories").glob("*.txt")) + [DATA / "tinyshakespeare.txt"]
    return [t for f in files if f.name != "README.txt" for t, _, _ in iter_records(f) if t.strip()]


def generate(path: Path, size: int) -> tuple[int, int]:
    """JSONL of {"text": "Document <n>.\\n<real text>"} until `size` bytes; returns (documents, bytes)."""
    docs = source_documents()
    encoded = [json.dumps(d)[1:-1] for d in docs]  # JSON-escaped bodies, reused every round
    n = written = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < size:
            for body in encoded:
                line = f'{{"text": "Document {n}.\\n{body}"}}\n'
                fh.write(line)
                n += 1
                written += len(line)
                if written >= size:
                    break
    return n, written


CHILD = """
import json, sys, time
from pathlib import Path
from chatforge.config import DataConfig
from chatforge.data.prepare import prepare_corpus
t = time.perf_counter()
m = prepare_corpus(DataConfig(inputs=[sys.argv[1]], workers=int(sys.argv[3])), Path(sys.argv[2]))
print(json.dumps({"seconds": time.perf_counter() - t, "kept": m["documents_kept"], "read": m["documents_read"],
                  "dropped": m["dropped"], "train": m["splits"]["train"]["documents"],
                  "val": m["splits"]["val"]["documents"],
                  "compressed": sum(s["compressed_bytes"] for sp in m["splits"].values() for s in sp["shards"])}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the generated input and output in /tmp")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: nothing to benchmark")
    tmp = Path(tempfile.mkdtemp(prefix="chatforge-mem-", dir="/tmp"))
    try:
        src = tmp / "big.jsonl"
        t = time.perf_counter()
        n, size = generate(src, int(args.size_gb * 1e9))
        print(f"input: {src} {size / 1e9:.2f} GB, {n} documents (generated in {time.perf_counter() - t:.0f} s)")
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp / "out"), str(args.workers)],
                             capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - t
        if out.returncode:
            raise SystemExit(f"prepare failed:\n{out.stderr[-3000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        print(f"prepare (workers={args.workers}): {res['seconds']:.0f} s, {size / 1e6 / res['seconds']:.1f} MB/s; "
              f"{res['read']} read, {res['kept']} kept (train {res['train']}, val {res['val']}), "
              f"dropped {res['dropped']}; shards {res['compressed'] / 1e6:.0f} MB compressed")
        print(f"peak RSS of the prepare process: {peak_mb:.0f} MB (goal < 1500 MB) -> "
              f"{'OK' if peak_mb < 1500 else 'OVER'}; wall {wall:.0f} s")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from chatforge.machine import describe
    print(describe(), flush=True)
    main()
