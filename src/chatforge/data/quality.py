"""Document quality filters in the spirit of the Gopher rules (Rae et al. 2021, appendix A), plus PII masking
and optional language identification.

The Gopher rules were written for web prose. Python source fails several of them by design (comments start
with '#', lines like `return None` repeat, many tokens are symbols), and the default corpus is the standard
library, so the word-level rules run only when `data.quality_filters` is on. The length bounds (min_chars,
max_chars) always apply and live in prepare.py. Every threshold can be switched off on its own with 0.

`QualityFilter.check(text)` returns the name of the first failed rule (the reason counted in the manifest's
"dropped"), or None. It is a pure function of the text, so workers can run it in any process.
"""
from __future__ import annotations

import importlib
import re
from collections import Counter

from ..config import DataConfig
from ..errors import UserError

_WORD = re.compile(r"\S+")
_ALNUM_WORD = re.compile(r"\w+")
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# Dotted quads with each part 0-255. IPv6: the full 8-group form, or a compressed one with a group on each
# side of "::" (so times like 12:30:45, "::1" and slices like x[a::b] in code stay as they are).
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\d)")
_H = r"[0-9A-Fa-f]{1,4}"
_IPV6 = re.compile(rf"(?<![\w:])(?:(?:{_H}:){{7}}{_H}|(?:{_H}:){{1,6}}:(?:{_H}:){{0,5}}{_H})(?![\w:])")
EMAIL_MASK, IP_MASK = "<EMAIL>", "<IP>"


def mask_pii(text: str) -> tuple[str, int, int]:
    """(text with e-mail and IP addresses replaced by <EMAIL>/<IP>, e-mails masked, IPs masked)."""
    n_email = n_ip = 0
    if "@" in text:
        text, n_email = _EMAIL.subn(EMAIL_MASK, text)
    if "." in text:
        text, n4 = _IPV4.subn(IP_MASK, text)
        n_ip += n4
    if "::" in text or text.count(":") >= 3:
        text, n6 = _IPV6.subn(IP_MASK, text)
        n_ip += n6
    return text, n_email, n_ip


# ------------------------------------------------------------------------------------------- statistics


def mean_word_length(words: list[str]) -> float:
    return sum(map(len, words)) / len(words) if words else 0.0


def alpha_ratio(text: str) -> float:
    """Alphabetic characters / non-whitespace characters (prose ~0.8-0.95, tables of numbers ~0.1)."""
    visible = len(text) - sum(text.count(c) for c in " \n\t")
    if visible <= 0:
        return 0.0
    return sum(c.isalpha() for c in text) / visible


def symbol_ratio(text: str, n_words: int) -> float:
    """Gopher: ('#' + ellipses) per word. Hash-tag spam and truncated snippets score high."""
    if not n_words:
        return 0.0
    return (text.count("#") + text.count("...") + text.count("\u2026")) / n_words


def duplicate_line_fraction(text: str) -> float:
    """Share of characters in non-blank lines that repeat an earlier line (Gopher's duplicate-line char fraction)."""
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    total = sum(map(len, lines))
    if not total:
        return 0.0
    seen: set[str] = set()
    dup = 0
    for ln in lines:
        if ln in seen:
            dup += len(ln)
        else:
            seen.add(ln)
    return dup / total


def repeated_ngram_fraction(words: list[str], n: int) -> float:
    """Share of word characters covered by word n-grams that occur more than once (Gopher's duplicate
    n-gram character fraction): near 0 for prose, high for boilerplate and spam loops."""
    if len(words) < n or n <= 0:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0.0
    covered = [False] * len(words)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for j in range(i, i + n):
                covered[j] = True
    total = sum(map(len, words))
    return sum(len(w) for w, c in zip(words, covered) if c) / total if total else 0.0


# ------------------------------------------------------------------------------------------- language ID


class LanguageID:
    """Wraps whichever language-ID package is installed (langid, then langdetect). None installed and
    languages requested -> UserError: we do not silently skip a filter the user asked for."""

    PACKAGES = ("langid", "langdetect")

    def __init__(self, languages: list[str], min_score: float) -> None:
        self.languages = {x.lower() for x in languages}
        self.min_score = min_score
        self.package = None
        for name in self.PACKAGES:
            try:
                self._mod = importlib.import_module(name)
            except ImportError:
                continue
            self.package = name
            break
        if self.package is None:
            raise UserError(f"data.languages={sorted(self.languages)} needs a language-ID package; install one of "
                            f"{', '.join(self.PACKAGES)} (pip install langid) or set data.languages=[]")
        if self.package == "langdetect":
            self._mod.DetectorFactory.seed = 0  # langdetect is random unless seeded

    def detect(self, text: str) -> tuple[str, float]:
        sample = text[:4000]
        if self.package == "langid":
            if not hasattr(self, "_ident"):  # normalised probabilities, so min_score is a probability
                from langid.langid import LanguageIdentifier, model
                self._ident = LanguageIdentifier.from_modelstring(model, norm_probs=True)
            lang, score = self._ident.classify(sample)
            return lang, float(score)
        try:
            best = self._mod.detect_langs(sample)[0]
        except Exception:  # langdetect raises on text with no letters
            return "unknown", 0.0
        return best.lang, float(best.prob)

    def keep(self, text: str) -> bool:
        lang, score = self.detect(text)
        return lang.split("-")[0].lower() in self.languages and score >= self.min_score


# ------------------------------------------------------------------------------------------- filter


class QualityFilter:
    """The configured rules; `check(text)` -> reason or None. Build once per process."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.enabled = cfg.quality_filters
        self.lang = LanguageID(cfg.languages, cfg.min_language_score) if cfg.languages else None

    def check(self, text: str) -> str | None:
        c = self.cfg
        if self.enabled:
            words = _WORD.findall(text)
            n = len(words)
            if c.min_words and n < c.min_words:
                return "too_few_words"
            if c.max_words and n > c.max_words:
                return "too_many_words"
            mwl = mean_word_length(words)
            if (c.min_mean_word_length and mwl < c.min_mean_word_length) or \
                    (c.max_mean_word_length and mwl > c.max_mean_word_length):
                return "mean_word_length"
            if c.min_alpha_ratio and alpha_ratio(text) < c.min_alpha_ratio:
                return "alpha_ratio"
            if c.max_symbol_ratio and symbol_ratio(text, n) > c.max_symbol_ratio:
                return "symbol_ratio"
            if c.max_duplicate_line_fraction and duplicate_line_fraction(text) > c.max_duplicate_line_fraction:
                return "duplicate_lines"
            if c.max_repeated_ngram_fraction and \
                    repeated_ngram_fraction(words, c.repeated_ngram_size) > c.max_repeated_ngram_fraction:
                return "repeated_ngrams"
        if self.lang is not None and not self.lang.keep(text):
            return "language"
        return None
