"""Local vs Ray executor for `prepare` and `encode`, on this machine and the same data: wall time, MB/s of
JSONL input and the ratio; for Ray prepare also its phases (map = read+clean tasks, the exact and near
group-bys, the driver's ordered write pass) and the write pass's MB/s, the bound of a big cluster.

Data: shared/data/tinystories/*.txt + tinyshakespeare.txt (skipped when absent), written as JSONL files.
Ray runs on a loopback cluster with as many CPUs as the local pool has workers; its start-up time is reported
separately (a real cluster is started once, not per job). Every Ray output is checked byte for byte
against the local one.

    python benchmarks/bench_ray.py [--workers 2] [--scale 1]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

from chatforge.config import DataConfig, TokenizerConfig
from chatforge.data import ray_prepare
from chatforge.data.documents import iter_documents
from chatforge.data.prepare import prepare_corpus
from chatforge.data.shards import encode_documents
from chatforge.data.sources import ReadStats, iter_records
from chatforge.machine import describe
from chatforge.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def digest(folder: Path, skip=("manifest.json", "stats.json")) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in skip:
            h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2, help="local pool size = Ray CPUs")
    ap.add_argument("--scale", type=int, default=1, help="copies of the data (each made unique)")
    a = ap.parse_args()
    paths = sorted((DATA / "tinystories").glob("*.txt")) + [DATA / "tinyshakespeare.txt"]
    paths = [p for p in paths if p.is_file() and p.name != "README.txt"]
    if not paths:
        print(f"skip: no data in {DATA}")
        return 0
    try:
        import ray
    except ImportError:
        print("skip: Ray is not installed (pip install 'chatforge[ray]')")
        return 0
    print(describe())
    print(f"CPU model: {cpu_model()}")
    print(f"ray {ray.__version__}; python {sys.version.split()[0]}")
    stats = ReadStats()
    docs = [t for p in paths for t, _, _ in iter_records(p, stats=stats)]
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    inputs = []
    for k in range(4):  # 4 files, so reading order spans files
        f = tmp / f"in{k}.jsonl"
        with open(f, "w") as fh:
            for c in range(a.scale):
                for t in docs[k::4]:
                    fh.write(json.dumps({"text": t if c == 0 else f"{t}\n(copy {c})"}) + "\n")
        inputs.append(str(f))
    mb = sum(Path(f).stat().st_size for f in inputs) / 1e6
    print(f"data: {len(docs) * a.scale:,} documents, {mb:.1f} MB JSONL in {len(inputs)} files")

    init_s, _ = timed(lambda: ray.init(num_cpus=a.workers, include_dashboard=False, log_to_driver=False))
    print(f"ray.init (loopback cluster, {a.workers} CPUs): {init_s:.2f} s (once per cluster, not counted below)")
    rows, phases = [], []
    try:
        for near in (True, False):  # the last output (no near-dedup: every copy kept) is encoded
            t1, _ = timed(lambda n=near: prepare_corpus(DataConfig(inputs, near_dedup=n, workers=1), tmp / "p1"))
            tl, _ = timed(lambda n=near: prepare_corpus(DataConfig(inputs, near_dedup=n, workers=a.workers),
                                                        tmp / "pl"))
            tr, _ = timed(lambda n=near: prepare_corpus(DataConfig(inputs, near_dedup=n, executor="ray"), tmp / "pr"))
            phases.append((near, dict(ray_prepare.LAST_RUN)))
            same = digest(tmp / "pl") == digest(tmp / "pr") == digest(tmp / "p1") and \
                json.loads((tmp / "pl" / "manifest.json").read_text())["dropped"] == \
                json.loads((tmp / "pr" / "manifest.json").read_text())["dropped"]
            rows.append((f"prepare near_dedup={near}", t1, tl, tr, same))
        tok = Tokenizer.train(iter_documents(tmp / "pl", "train"), TokenizerConfig(vocab_size=2048))
        tl, _ = timed(lambda: encode_documents(tok, tmp / "pl", tmp / "el", a.workers))
        tr, _ = timed(lambda: encode_documents(tok, tmp / "pl", tmp / "er", a.workers, executor="ray"))
        rows.append(("encode (vocab 2048)", None, tl, tr, digest(tmp / "el") == digest(tmp / "er")))
    finally:
        ray.shutdown()
    print(f"\n{'stage':<28}{'local w=1':>11}{f'local w={a.workers}':>11}{'ray':>9}"
          f"{'local MB/s':>12}{'ray MB/s':>10}{'ray/local':>11}  identical")
    for name, t1, tl, tr, same in rows:
        print(f"{name:<28}{(f'{t1:.2f}s' if t1 else '-'):>11}{tl:>10.2f}s{tr:>8.2f}s"
              f"{mb / tl:>12.1f}{mb / tr:>10.1f}{tl / tr:>10.2f}x  {same}")
    print("(MB/s: JSONL input per second of wall time; ray/local > 1 means Ray is faster)")
    for near, ph in phases:
        print(f"ray prepare near_dedup={near} phases: " + ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in ph.items())
              + f"; write pass {mb / ph['write_s']:.1f} MB/s of input")
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
