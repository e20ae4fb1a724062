"""Throughput of the prepare stage's core (clean + length filter + exact dedup + hash split) in MB/s.

Data: the English text in shared/data (TinyStories, tinyshakespeare, SFT instruction/output texts; never
shared/data/heldout). Compared with the same pipeline written as Hugging Face `datasets` map/filter calls,
when `datasets` is importable. Also reports the end-to-end `prepare_corpus` rate (read JSONL + write zstd shards).

    python benchmarks/bench_prepare.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from chatforge.config import DataConfig
from chatforge.data.clean import clean_text
from chatforge.data.dedup import ExactDedup, dedup_key, split_fraction
from chatforge.data.prepare import prepare_corpus
from chatforge.data.sources import ReadStats, iter_json_objects, iter_records

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MIN_CHARS, MAX_CHARS, VAL, SALT = 32, 1_000_000, 0.05, "chatforge"


def load_documents() -> list[str]:
    stats = ReadStats()
    docs: list[str] = []
    for path in sorted((DATA / "tinystories").glob("*.txt")) + [DATA / "tinyshakespeare.txt"]:
        if path.name != "README.txt":
            docs += [t for t, _, _ in iter_records(path, stats=stats)]
    for path in sorted((DATA / "sft").glob("*.json")):
        for rec, _ in iter_json_objects(path, stats):
            docs.append("\n\n".join(rec.get(k) or "" for k in ("instruction", "input", "output")))
    return docs


def chatforge_pipeline(docs: list[str]) -> tuple[int, int]:
    exact = ExactDedup()
    n_train = n_val = 0
    for raw in docs:
        text = clean_text(raw)
        if not (MIN_CHARS <= len(text) <= MAX_CHARS) or exact.is_duplicate(text):
            continue
        if split_fraction(text, SALT) < VAL:
            n_val += 1
        else:
            n_train += 1
    return n_train, n_val


def hf_pipeline(docs: list[str]) -> tuple[int, int]:
    import datasets

    datasets.disable_progress_bars()
    # In memory and with fixed fingerprints: no Arrow cache files and no hashing of the functions, which is
    # the fastest way to run datasets and so the fairest comparison.
    kw = dict(batched=True, keep_in_memory=True)
    from datasets.table import InMemoryTable

    ds = datasets.Dataset(InMemoryTable.from_pydict({"text": docs}), fingerprint="docs")
    ds = ds.map(lambda b: {"text": [clean_text(t) for t in b["text"]]}, new_fingerprint="clean", **kw)
    ds = ds.filter(lambda b: [MIN_CHARS <= len(t) <= MAX_CHARS for t in b["text"]], new_fingerprint="len", **kw)
    seen: set[bytes] = set()

    def first_seen(batch):
        keep = []
        for t in batch["text"]:
            k = dedup_key(t)
            keep.append(k not in seen)
            seen.add(k)
        return keep

    ds = ds.filter(first_seen, new_fingerprint="dedup", **kw)  # single process: `seen` must be shared
    ds = ds.map(lambda b: {"val": [split_fraction(t, SALT) < VAL for t in b["text"]]}, new_fingerprint="split", **kw)
    n_val = sum(ds["val"])
    return len(ds) - n_val, n_val


def best_time(fn, docs, repeat):
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn(docs)
        best = min(best, time.perf_counter() - t)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: nothing to benchmark")
    docs = load_documents()
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"input: {len(docs)} documents, {mb:.1f} MB of English text")

    t_cf, res_cf = best_time(chatforge_pipeline, docs, args.repeat)
    print(f"chatforge core  : {mb / t_cf:8.1f} MB/s  ({t_cf:.2f} s; train/val = {res_cf})")

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "docs.jsonl"
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        t = time.perf_counter()
        m = prepare_corpus(DataConfig(inputs=[str(src)], min_chars=MIN_CHARS, val_fraction=VAL), Path(tmp) / "out")
        t_e2e = time.perf_counter() - t
        print(f"prepare_corpus  : {mb / t_e2e:8.1f} MB/s  ({t_e2e:.2f} s end to end: read JSONL, write zstd; "
              f"train/val = {m['splits']['train']['documents']}, {m['splits']['val']['documents']})")
        for workers in (2,):
            t = time.perf_counter()
            prepare_corpus(DataConfig(inputs=[str(src)], min_chars=MIN_CHARS, val_fraction=VAL, workers=workers),
                           Path(tmp) / f"out{workers}")
            t_w = time.perf_counter() - t
            print(f"  workers={workers}     : {mb / t_w:8.1f} MB/s  ({t_w:.2f} s; byte-identical output)")
        t = time.perf_counter()
        m = prepare_corpus(DataConfig(inputs=[str(src)], min_chars=MIN_CHARS, val_fraction=VAL, near_dedup=True),
                           Path(tmp) / "near")
        t_near = time.perf_counter() - t
        print(f"  + near-dedup   : {mb / t_near:8.1f} MB/s  ({t_near:.2f} s end to end, MinHash LSH 128 perms; "
              f"{m['dropped'].get('near_duplicate', {}).get('documents', 0)} near copies dropped)")

    try:
        import datasets  # noqa: F401
    except ImportError:
        print("HF datasets      : skipped (`datasets` is not installed); no ratio")
        return
    t_hf, res_hf = best_time(hf_pipeline, docs, args.repeat)
    assert res_hf == res_cf, (res_hf, res_cf)  # same pipeline, same result
    print(f"HF datasets     : {mb / t_hf:8.1f} MB/s  ({t_hf:.2f} s; train/val = {res_hf})")
    print(f"ratio chatforge / datasets: {t_hf / t_cf:.2f}x")


if __name__ == "__main__":
    from chatforge.machine import describe
    print(describe(), flush=True)
    main()
