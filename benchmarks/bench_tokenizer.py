"""Tokenizer benchmark: training time, compression, and text -> token shard throughput.

    python benchmarks/bench_tokenizer.py [--mb 10] [--vocab 4096] [--repeat 5]

Corpus: English text from ../shared/data (TinyStories subsets + tinyshakespeare; never heldout/), cut into
documents and repeated up to --mb MB. Documents are split 90/10; compression (bytes per token) is measured on
the 10% neither tokenizer was trained on.

Compared, each in --repeat interleaved rounds (best and median reported; the machine is shared, so the load
average is printed too, and CPU-seconds, which load inflates far less than wall time):
- training: chatforge's Tokenizer.train (GPT-4 split regex, byte-level BPE) vs HF's ByteLevelBPETokenizer in
  its default setup (GPT-2 regex, same vocab size and min_frequency), both on the same text;
- throughput: chatforge write_shards (encode + write .bin/.idx) with workers=0 (all cores) and 1, against
  the peers: HF tokenizers' encode_batch (what write_shards used before) and tiktoken's
  encode_ordinary_batch with our vocabulary and regex (tiktoken's gpt2 files need a download).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from chatforge.config import TokenizerConfig  # noqa: E402
from chatforge.data.shards import open_shards, write_shards  # noqa: E402
from chatforge.chat_format import SPECIAL_TOKENS  # noqa: E402
from chatforge.tokenizer import Tokenizer, available_cores, compression_report  # noqa: E402
from chatforge.tokenizer_train import SPLIT_PATTERN  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def load_docs() -> list[str]:
    docs: list[str] = []
    ts = DATA / "tinystories"
    for p in sorted(ts.glob("*.txt")):
        if p.name == "README.txt":
            continue
        text = p.read_text(encoding="utf-8")
        sep = "<|endoftext|>" if "<|endoftext|>" in text else "\n\n"
        parts = text.split(sep) if sep in text else text.split("\n")
        docs += [d.strip() for d in parts if d.strip()]
    shakespeare = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    docs += [d for d in shakespeare.split("\n\n") if d.strip()]
    return docs


def mb(texts: list[str]) -> float:
    return sum(len(t.encode()) for t in texts) / 1e6


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rounds(methods: dict, repeat: int) -> dict:
    """Run every method `repeat` times, round-robin (a load burst then hits all of them alike)."""
    res = {k: {"wall": [], "cpu": [], "out": None} for k in methods}
    for _ in range(repeat):
        for label, fn in methods.items():
            c0, t0 = cpu_seconds(), time.perf_counter()
            res[label]["out"] = fn()
            res[label]["wall"].append(time.perf_counter() - t0)
            res[label]["cpu"].append(cpu_seconds() - c0)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=10.0, help="corpus size in MB (documents repeated to reach it)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds per measurement")
    args = ap.parse_args()
    if not (DATA / "tinyshakespeare.txt").is_file():
        sys.exit(f"no data at {DATA}")
    import tiktoken
    from tokenizers import ByteLevelBPETokenizer

    base = load_docs()
    n_test = len(base) // 10
    test_docs, train_base = base[:n_test], base[n_test:]
    docs: list[str] = []
    size = 0
    while size < args.mb * 1e6:
        for d in train_base:
            docs.append(d)
            size += len(d.encode())
            if size >= args.mb * 1e6:
                break
    size_mb = size / 1e6
    cores = available_cores()
    print(f"corpus: {len(base)} unique documents ({mb(base):.1f} MB), train/encode text {size_mb:.1f} MB "
          f"({len(docs)} documents), test {mb(test_docs):.2f} MB; vocab {args.vocab}; {cores} cores; "
          f"load average {os.getloadavg()[0]:.1f}\n")

    # ---- training ----
    cfg = TokenizerConfig(vocab_size=args.vocab, min_frequency=2)

    def train_ref():
        ref = ByteLevelBPETokenizer()
        ref.train_from_iterator(docs, vocab_size=args.vocab, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                show_progress=False)
        return ref
    tr = rounds({"chatforge Tokenizer.train": lambda: Tokenizer.train(docs, cfg),
                 "HF ByteLevelBPETokenizer (reference)": train_ref}, max(1, args.repeat // 2))
    tok, ref = tr["chatforge Tokenizer.train"]["out"], tr["HF ByteLevelBPETokenizer (reference)"]["out"]
    print(f"training on {size_mb:.1f} MB ({len(tr['chatforge Tokenizer.train']['wall'])} rounds)")
    print(f"{'tokenizer':40s} {'best s':>7s} {'median s':>9s} {'cpu s':>6s}")
    for label, r in tr.items():
        print(f"{label:40s} {min(r['wall']):7.2f} {statistics.median(r['wall']):9.2f} {min(r['cpu']):6.2f}")
    ours = compression_report(tok, test_docs)
    ref_tokens = sum(len(e.ids) for e in ref.encode_batch(test_docs))
    print(f"\ncompression on the held-out {mb(test_docs):.2f} MB: chatforge {ours['bytes_per_token']:.3f} bytes/token, "
          f"HF ByteLevelBPETokenizer {ours['bytes'] / ref_tokens:.3f} "
          f"(ratio {ours['bytes_per_token'] / (ours['bytes'] / ref_tokens):.3f}; >1 = chatforge needs fewer tokens)")
    print(f"fast encoder: {tok.fast_backend} {tok.fast_note}\n")

    # ---- throughput ----
    ranks = {b: i for i, b in enumerate(tok.token_bytes()) if i >= len(SPECIAL_TOKENS)}
    tik = tiktoken.Encoding("chatforge", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    tmp = tempfile.TemporaryDirectory()
    hf = tok.hf
    n_docs = len(docs)
    methods = {
        "chatforge write_shards workers=0 (all cores)":
            lambda: write_shards(tok, docs, Path(tmp.name) / "w0", workers=0)["tokens"],
        "chatforge write_shards workers=1": lambda: write_shards(tok, docs, Path(tmp.name) / "w1", workers=1)["tokens"],
        # peers: ids pulled into Python lists inside the timing (every consumer needs them); +1 per doc = <|bos|>
        "HF tokenizers encode_batch (all cores)": lambda: sum(
            len(e.ids) for e in hf.encode_batch(docs, add_special_tokens=False)) + n_docs,
        f"tiktoken encode_ordinary_batch (threads={cores})": lambda: sum(
            map(len, tik.encode_ordinary_batch(docs, num_threads=cores))) + n_docs,
    }
    res = rounds(methods, args.repeat)
    tmp_out = Path(tmp.name) / "check"
    write_shards(tok, docs, tmp_out, workers=0)
    (shard,) = open_shards(tmp_out, tok_hash=tok.hash)
    check = docs[:3000]
    ends = list(shard.doc_starts[1:len(check)]) + [shard.doc_starts[len(check)]]
    same = all(shard.tokens[a + 1:b].tolist() == tok.encode(t) for t, a, b in zip(check, shard.doc_starts, ends))
    tmp.cleanup()
    counts = {r["out"] for r in res.values()}

    hf_best = min(res["HF tokenizers encode_batch (all cores)"]["wall"])
    tik_best = min(res[f"tiktoken encode_ordinary_batch (threads={cores})"]["wall"])
    print(f"text -> tokens on {size_mb:.1f} MB, {args.repeat} interleaved rounds; load average now "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'path':48s} {'best MB/s':>9s} {'median':>7s} {'cpu s':>6s} {'vs HF':>6s} {'vs tiktoken':>11s}")
    for label, r in res.items():
        best, med = min(r["wall"]), statistics.median(r["wall"])
        print(f"{label:48s} {size_mb / best:9.2f} {size_mb / med:7.2f} {min(r['cpu']):6.2f} "
              f"{hf_best / best:5.2f}x {tik_best / best:10.2f}x")
    print(f"token counts agree across methods: {len(counts) == 1}; shard ids equal Tokenizer.encode (HF) on the "
          f"first {len(check)} documents: {same}")


if __name__ == "__main__":
    from chatforge.machine import describe
    print(describe(), flush=True)
    main()
