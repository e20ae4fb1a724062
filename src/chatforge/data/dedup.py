"""Exact and near-duplicate detection, and the salted hash that assigns documents to splits."""
from __future__ import annotations

import hashlib
import re

_WORD = re.compile(r"\w+")


def dedup_key(text: str) -> bytes:
    """Hash of the text with all whitespace runs collapsed: copies that differ only in wrapping or
    indentation are the same document for training purposes."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()


def dedup_hash(text: str) -> int:
    """dedup_key as a 64-bit int: what ExactDedup stores (a Python int is ~3x smaller in a set than bytes;
    at 2^-64 per pair, a collision in a billion documents has odds of about 3%, i.e. one lost document)."""
    return int.from_bytes(hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=8).digest(), "big")


def split_fraction(text: str, salt: str) -> float:
    """A number in [0, 1) that depends only on (salt, text): the same document lands in the same split on
    every machine and in every run, whatever the input order."""
    h = hashlib.blake2b(salt.encode("utf-8") + b"\0" + text.encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "big") / 2**64


class ExactDedup:
    """Remembers 64-bit hashes only (about 70 bytes per document in a set), so memory stays small even for
    millions of documents."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def is_duplicate(self, text: str) -> bool:
        return self.is_duplicate_hash(dedup_hash(text))

    def is_duplicate_hash(self, key: int) -> bool:
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


class NearDedup:
    """MinHash LSH (datasketch) over word 5-gram shingles: drops a document whose estimated Jaccard
    similarity to an earlier kept one is above `threshold`. Fixed seed -> deterministic."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        from datasketch import LeanMinHash, MinHash, MinHashLSH

        self._MinHash, self._Lean = MinHash, LeanMinHash
        # Generating the permutations costs ~0.2 ms per MinHash; make them once and share them.
        self._template = MinHash(num_perm=num_perm, seed=seed)
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._n = 0

    def signature(self, text: str):
        """The MinHash hash values (a numpy array): a pure function of the text, so worker processes can
        compute them and the main process only queries the index."""
        words = _WORD.findall(text.lower())
        n = self.ngram
        shingles = {" ".join(words[i:i + n]).encode() for i in range(max(1, len(words) - n + 1))}
        t = self._template
        m = self._MinHash(num_perm=self.num_perm, seed=self.seed, permutations=t.permutations, scheme=t.scheme)
        m.update_batch(sorted(shingles))
        return m.hashvalues

    def is_duplicate(self, text: str) -> bool:
        return self.is_duplicate_signature(self.signature(text))

    def is_duplicate_signature(self, hashvalues) -> bool:
        m = self._Lean(seed=self.seed, hashvalues=hashvalues, scheme=self._template.scheme)
        if self._lsh.query(m):
            return True
        self._lsh.insert(self._n, m)
        self._n += 1
        return False
