"""Exact and near-duplicate detection, and the salted hash that assigns documents to splits."""
from __future__ import annotations

import hashlib
import re

_WORD = re.compile(r"\w+")


def dedup_key(text: str) -> bytes:
    """Hash of the text with all whitespace runs collapsed: copies that differ only in wrapping or
    indentation are the same document for training purposes."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()


def split_fraction(text: str, salt: str) -> float:
    """A number in [0, 1) that depends only on (salt, text): the same document lands in the same split on
    every machine and in every run, whatever the input order."""
    h = hashlib.blake2b(salt.encode("utf-8") + b"\0" + text.encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "big") / 2**64


class ExactDedup:
    """Remembers 16-byte digests only, so memory stays small even for millions of documents."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        key = dedup_key(text)
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


class NearDedup:
    """MinHash LSH (datasketch) over word 5-gram shingles: drops a document whose estimated Jaccard
    similarity to an earlier kept one is above `threshold`. Fixed seed -> deterministic."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        from datasketch import MinHash, MinHashLSH

        self._MinHash = MinHash
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._n = 0

    def _signature(self, text: str):
        words = _WORD.findall(text.lower())
        n = self.ngram
        shingles = {" ".join(words[i:i + n]).encode() for i in range(max(1, len(words) - n + 1))}
        m = self._MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch(list(shingles))
        return m

    def is_duplicate(self, text: str) -> bool:
        m = self._signature(text)
        if self._lsh.query(m):
            return True
        self._lsh.insert(self._n, m)
        self._n += 1
        return False
