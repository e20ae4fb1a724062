"""Learning a vocabulary from text: byte-level BPE or character-level, on HF `tokenizers`.

Lone surrogates (e.g. from a JSON "\\ud800" escape) are not valid Unicode and cannot be UTF-8 encoded:
they are replaced with U+FFFD (replace_surrogates) rather than failing a whole corpus on one bad character.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, ByteLevelBPETokenizer, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from .chat_format import SPECIAL_TOKENS
from .config import TokenizerConfig
from .errors import UserError

# GPT-4 (cl100k) pre-tokenization: contractions, letter runs with one leading non-letter, digit groups of
# at most 3, punctuation runs, newlines, and whitespace that leaves one space to lead the next word.
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text)


def keep_sample(texts: Iterable[str], sample: list[str], limit: int) -> Iterator[str]:
    """Pass texts through, keeping the first ones (up to `limit` characters) in `sample`."""
    n = 0
    for t in texts:
        if n < limit:
            sample.append(t[: limit - n])
            n += len(sample[-1])
        yield t


def take_bytes(texts: Iterable[str], limit: int) -> Iterable[str]:
    """Yield texts until `limit` UTF-8 bytes have been given (the last one cut to fit)."""
    left = limit
    for t in texts:
        if left <= 0:
            return
        if not t.isascii():  # (isascii is O(1) in CPython: most English documents skip the cleaning)
            t = replace_surrogates(t)
        n = len(t) if t.isascii() else len(t.encode("utf-8"))
        if n > left:
            t = t.encode("utf-8")[:left].decode("utf-8", "ignore")
            n = left
        left -= n
        yield t


def _special_added_tokens() -> list[AddedToken]:
    return [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]


def build_bpe(texts: Iterable[str], cfg: TokenizerConfig) -> HFTokenizer:
    """Train byte-level BPE on `texts` (already cut to cfg.max_train_bytes by Tokenizer.train).

    Speed: ~95% of the time is HF's word counting (split regex + byte mapping per document), not the merges
    (a 263-token vocab trains about as long as a 4096 one), so merge-side settings (max_token_length, ...)
    do not help; documents are fed as they come (joining them into ~100 KB chunks was no faster, and would
    count pieces across document boundaries that encoding never sees). ~1.7 s per 10 MB on one core.
    """
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    min_vocab = len(SPECIAL_TOKENS) + 256
    if cfg.vocab_size < min_vocab:
        raise UserError(f"tokenizer.vocab_size={cfg.vocab_size} is too small for byte-level BPE; use at least {min_vocab}")
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=_special_added_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text is encodable
        # Cap learned tokens at 32 bytes (byte-level: one char per byte): deep indentation or long symbol runs
        # would otherwise grow into huge one-off tokens that waste vocabulary slots.
        max_token_length=32,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_char(texts: Iterable[str], cfg: TokenizerConfig) -> HFTokenizer:
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for c in sorted(chars - set(SPECIAL_TOKENS)):
        vocab[c] = len(vocab)
    # No unk token: an unseen character is an error (see Tokenizer.encode), never silent data loss.
    tok = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # WordLevel would otherwise join tokens with spaces
    tok.add_special_tokens(_special_added_tokens())
    return tok


def reference_bytes_per_token(train_texts: Iterable[str], val_texts: Iterable[str], vocab_size: int,
                              max_train_bytes: int = 5_000_000, max_val_bytes: int = 5_000_000) -> float:
    """Bytes per token on `val_texts` of the peer library's stock byte-level BPE (HF ByteLevelBPETokenizer:
    GPT-2 split regex, our special tokens, min_frequency 2) trained on `train_texts` with the same vocab size.

    Training text is capped at `max_train_bytes` (about 0.2 CPU-seconds per MB) and validation text at
    `max_val_bytes` (encoded at ~3 MB/s); pass the same cap to compression_report for a like-for-like figure.
    """
    ref = ByteLevelBPETokenizer()
    ref.train_from_iterator(take_bytes(train_texts, max_train_bytes), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    val = list(take_bytes(val_texts, max_val_bytes))
    n_tok = sum(len(e.ids) for e in ref.encode_batch(val)) if val else 0
    n_bytes = sum(len(t.encode("utf-8")) for t in val)
    return n_bytes / max(n_tok, 1)
