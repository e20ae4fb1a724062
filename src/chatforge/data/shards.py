"""Token shards: the encoded corpus as flat binary files a trainer can memory-map.

out_dir/shard_00000.bin       256-byte header, then the tokens (uint16 if the vocab fits, else uint32)
out_dir/shard_00000.idx.npy   int64 start offset of every document in that shard

Each document is `<|bos|>` + encode(text); documents never straddle shards, so a shard is closed before a
document would push it past `shard_tokens` (a single document longer than that gets a shard of its own).
The header records the tokenizer hash and vocab size, so shards from another tokenizer are refused at load
time instead of silently training on wrong ids.
"""
from __future__ import annotations

import struct
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from ..tokenizer import VERIFY_BYTES, Tokenizer, available_cores, split_even
from .executors import check_executor

MAGIC = b"CFTOKENS"
VERSION = 1
HEADER_BYTES = 256
# magic, version, bytes per token, vocab size, token count, doc count, tokenizer hash (16 hex chars)
_HEADER = struct.Struct("<8sIIQQQ16s")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
BATCH_BYTES = 4 << 20  # text read per step: a run per worker, each big enough to amortise the call


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (half the disk and memory bandwidth), else uint32."""
    return _DTYPES[2] if vocab_size <= 65535 else _DTYPES[4]


def pack_header(vocab_size: int, tok_hash: str, n_tokens: int, n_docs: int) -> bytes:
    dtype = token_dtype(vocab_size)
    raw = _HEADER.pack(MAGIC, VERSION, dtype.itemsize, vocab_size, n_tokens, n_docs, tok_hash.encode("ascii"))
    return raw.ljust(HEADER_BYTES, b"\0")


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
        raise UserError(f"{path} is not a chatforge token shard; re-run `chatforge encode --force`")
    magic, version, itemsize, vocab, n_tok, n_docs, h = _HEADER.unpack_from(raw)
    if version != VERSION or itemsize not in _DTYPES:
        raise UserError(f"{path}: shard format version {version} (token width {itemsize}) is not supported by this "
                        f"chatforge (version {VERSION}); re-run `chatforge encode --force`")
    return {"version": version, "dtype": str(_DTYPES[itemsize]), "itemsize": itemsize, "vocab_size": vocab,
            "tokens": n_tok, "docs": n_docs, "tokenizer_hash": h.decode("ascii")}


@dataclass
class Shard:
    path: Path
    tokens: np.ndarray  # read-only memmap, 1-D
    doc_starts: np.ndarray  # int64 offsets into tokens, one per document
    header: dict

    def __len__(self) -> int:
        return len(self.tokens)


class _ShardWriter:
    """Appends documents to shard files, closing one before it would exceed `shard_tokens`."""

    def __init__(self, out_dir: Path, tok: Tokenizer, shard_tokens: int):
        self.out_dir, self.tok, self.cap = out_dir, tok, shard_tokens
        self.dtype = token_dtype(tok.vocab_size)
        self.index = 0
        self.f = None
        self.n_tok = 0
        self.starts: list[int] = []

    def _open(self) -> None:
        self.path = self.out_dir / f"shard_{self.index:05d}.bin"
        self.f = open(self.path.with_suffix(".bin.tmp"), "wb")
        self.f.write(b"\0" * HEADER_BYTES)  # real header written at close, once the counts are known
        self.n_tok, self.starts = 0, []

    def close(self) -> None:
        if self.f is None:
            return
        self.f.seek(0)
        self.f.write(pack_header(self.tok.vocab_size, self.tok.hash, self.n_tok, len(self.starts)))
        self.f.close()
        np.save(self.out_dir / f"shard_{self.index:05d}.idx.npy", np.asarray(self.starts, dtype=np.int64))
        self.path.with_suffix(".bin.tmp").replace(self.path)  # a crashed run never leaves a half shard
        self.f = None
        self.index += 1

    def add(self, ids: np.ndarray, starts: np.ndarray) -> None:
        """Append documents given flat, as encode_documents returns them (each starts with <|bos|>)."""
        ids = ids.astype(self.dtype, copy=False)
        bounds = np.append(starts, len(ids)).tolist()
        seg = 0  # start (in ids) of the part not yet written to the open shard
        for a, b in zip(bounds[:-1], bounds[1:]):
            n = b - a
            if self.f is not None and self.n_tok + n > self.cap and self.starts:
                self.f.write(ids[seg:a].tobytes())
                seg = a
                self.close()
            if self.f is None:
                self._open()
            self.starts.append(self.n_tok)
            self.n_tok += n
        self.f.write(ids[seg:].tobytes())


def _batches(texts: Iterable[str], batch_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for t in texts:
        batch.append(t)
        size += len(t)  # chars, a cheap stand-in for bytes when sizing batches
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _utf8_len(texts: list[str]) -> int:
    """UTF-8 bytes of the text as encoded: a lone surrogate counts 3, as the U+FFFD it becomes does."""
    joined = "".join(texts)
    return len(joined) if joined.isascii() else len(joined.encode("utf-8", "surrogatepass"))


def write_shards(tok: Tokenizer, texts: Iterable[str], out_dir: Path, shard_tokens: int = 2**26,
                 workers: int = 0, executor: str = "local", ray_address: str = "", _remote=None) -> dict:
    """Encode documents into token shards. Output bytes do not depend on `workers`.

    Documents are read in batches of BATCH_BYTES and cut into runs encoded by `workers` threads (0 = every
    core this process may use; tiktoken and HF release the GIL while encoding), so reading the next batch
    overlaps encoding the current one; results are written in input order. workers=1 does everything in
    the calling thread. Stale shard files in out_dir are removed first, so a re-run never mixes old and
    new shards. The first batch is checked against HF's ids before the fast encoder is trusted with the rest
    (see Tokenizer.verify_fast). executor="ray": the runs are encoded by Ray tasks instead of threads
    (see executors.py); the bytes written are the same.
    """
    if shard_tokens < 1:
        raise UserError(f"shard_tokens={shard_tokens} must be positive")
    if _remote is None and check_executor(executor) == "ray":
        from .executors import RayEncoder, ray_session
        with ray_session(ray_address) as ray:
            return write_shards(tok, texts, out_dir, shard_tokens, workers, _remote=RayEncoder(ray, tok))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("shard_*.bin")) + list(out_dir.glob("shard_*.idx.npy")) + list(out_dir.glob("shard_*.bin.tmp")):
        old.unlink()
    workers = workers or available_cores()
    writer = _ShardWriter(out_dir, tok, shard_tokens)
    docs = tokens = bytes_in = 0
    start = time.perf_counter()
    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=f"encode {out_dir.name}", disable=not sys.stderr.isatty())

    def consume(result: tuple[np.ndarray, np.ndarray], nbytes: int) -> None:
        nonlocal docs, tokens, bytes_in
        ids, starts = result
        writer.add(ids, starts)
        docs += len(starts)
        tokens += len(ids)
        bytes_in += nbytes
        bar.update(nbytes)

    verified = False
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque = deque()  # (future per run, bytes) of batches in flight, oldest first
        for batch in _batches(texts, BATCH_BYTES):
            if not verified:
                tok.verify_fast(_head(batch, VERIFY_BYTES // 4))
                verified = True
            nbytes = _utf8_len(batch)
            if _remote is not None:  # runs of about RUN_CHARS to Ray tasks, written in order as they finish
                runs = split_even(batch, max(1, -(-sum(map(len, batch)) // _remote.RUN_CHARS)))
                pending.append((_remote.submit(runs), nbytes))
                while len(pending) > _remote.max_pending(len(runs)):
                    _drain(pending.popleft(), consume)
                continue
            if workers == 1:
                consume(tok.encode_documents(batch, threads=1), nbytes)
                continue
            futures = [pool.submit(tok.encode_documents, run, 1) for run in split_even(batch, workers)]
            pending.append((futures, nbytes))
            while len(pending) > 1:  # keep one batch encoding while the next one is read
                _drain(pending.popleft(), consume)
        while pending:
            _drain(pending.popleft(), consume)
    writer.close()
    bar.close()
    secs = time.perf_counter() - start
    return {"tokens": tokens, "docs": docs, "shards": writer.index, "bytes_in": bytes_in,
            "seconds": round(secs, 3), "mb_per_s": round(bytes_in / 1e6 / max(secs, 1e-9), 2)}


def _drain(item, consume) -> None:
    futures, nbytes = item
    results = [f.result() for f in futures]
    offsets = np.cumsum([0] + [len(ids) for ids, _ in results[:-1]])
    ids = np.concatenate([ids for ids, _ in results])
    starts = np.concatenate([st + off for (_, st), off in zip(results, offsets)])
    consume((ids, starts), nbytes)


def _head(texts: list[str], limit: int) -> list[str]:
    """The first documents of a batch, up to about `limit` characters."""
    out, n = [], 0
    for t in texts:
        if n >= limit:
            break
        out.append(t)
        n += len(t)
    return out


def open_shards(shard_dir: Path, tok_hash: str | None = None, vocab_size: int | None = None) -> list[Shard]:
    """Memory-map every shard in a directory, refusing shards made by a different tokenizer."""
    shard_dir = Path(shard_dir)
    paths = sorted(shard_dir.glob("shard_*.bin")) if shard_dir.is_dir() else []
    if not paths:
        raise UserError(f"no token shards in {shard_dir}: run `chatforge encode` first")
    shards = []
    for p in paths:
        h = read_header(p)
        if (tok_hash is not None and h["tokenizer_hash"] != tok_hash) or (
                vocab_size is not None and h["vocab_size"] != vocab_size):
            raise UserError(
                f"shard {p} was encoded with tokenizer {h['tokenizer_hash']} (vocab {h['vocab_size']}), but the current "
                f"tokenizer is {tok_hash or '?'} (vocab {vocab_size or '?'}); re-run `chatforge encode --force`")
        expected = HEADER_BYTES + h["tokens"] * h["itemsize"]
        if p.stat().st_size != expected:
            raise UserError(f"{p} is {p.stat().st_size} bytes but its header says {expected}: the file is damaged; "
                            "re-run `chatforge encode --force`")
        idx = p.with_name(p.name[:-4] + ".idx.npy")
        if not idx.is_file():
            raise UserError(f"{idx} is missing; re-run `chatforge encode --force`")
        starts = np.load(idx)
        if len(starts) != h["docs"]:
            raise UserError(f"{idx} lists {len(starts)} documents but {p} says {h['docs']}; re-run `chatforge encode --force`")
        tokens = (np.memmap(p, dtype=h["dtype"], mode="r", offset=HEADER_BYTES, shape=(h["tokens"],))
                  if h["tokens"] else np.zeros(0, dtype=h["dtype"]))
        shards.append(Shard(path=p, tokens=tokens, doc_starts=starts, header=h))
    return shards


def token_arrays(shard_dir: Path, tok: Tokenizer) -> list[np.ndarray]:
    """The memory-mapped token arrays of a split's shards, checked against the tokenizer."""
    return [s.tokens for s in open_shards(shard_dir, tok_hash=tok.hash, vocab_size=tok.vocab_size)]


def encode_documents(tok: Tokenizer, data_dir: Path, tokens_dir: Path, workers: int,
                     splits: tuple[str, ...] = ("train", "val"), executor: str = "local",
                     ray_address: str = "") -> dict:
    """Prepared documents (data_dir) -> token shards, one folder per split, and tokens_dir/stats.json.
    executor="ray": tokenizing runs on a Ray cluster (one connection for all splits)."""
    import json

    from .documents import iter_documents

    if check_executor(executor) == "ray":
        from .executors import RayEncoder, ray_session
        with ray_session(ray_address) as ray:
            stats = {split: write_shards(tok, iter_documents(data_dir, split), tokens_dir / split, workers=workers,
                                         _remote=RayEncoder(ray, tok)) for split in splits}
    else:
        stats = {split: write_shards(tok, iter_documents(data_dir, split), tokens_dir / split, workers=workers)
                 for split in splits}
    (tokens_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
