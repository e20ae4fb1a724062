"""The tokenizer: byte-level BPE (or character-level) on HF `tokenizers`, plus the chat format.

Special tokens are ids 0..6 in SPECIAL_TOKENS order. A conversation renders as

    <|bos|><|system|>{sys}<|end|><|user|>{q}<|end|><|assistant|>{a}<|end|><|user|>...

and the generation prompt appends `<|assistant|>`. The loss mask is 1 on assistant content tokens and on the
`<|end|>` that closes each assistant turn (so the model learns to stop), 0 everywhere else.

Special-token safety: ordinary text never turns into special ids. The runtime HF tokenizer runs with
`encode_special_tokens=True` (the literal string "<|end|>" is split and encoded as text); chat rendering
inserts special ids itself and encodes each content piece separately. The saved tokenizer.json keeps the
specials as normal HF special tokens, so `transformers` tokenizes a rendered chat string to the same ids.

Lone surrogates (e.g. from a JSON "\\ud800" escape) are not valid Unicode and cannot be UTF-8 encoded:
`encode` replaces each with U+FFFD rather than failing a whole corpus on one bad character.

Bulk encoding (encode_batch, encode_documents, hence token shards) has a fast path that gives the same ids
as the HF tokenizer, which stays the reference (it is what tokenizer.json and `transformers` run):
- BPE: tiktoken (optional dependency) built from our byte-level vocabulary (ranks = ids, which HF assigns
  in merge order), our split regex and the special tokens. Documents are joined with the real `<|bos|>`
  special, so one Rust call (GIL released, so threads run in parallel) encodes thousands of documents and
  returns the shard layout itself: `<|bos|>` + ids, per document. tiktoken ranks a merge by the token it
  makes while HF ranks merge pairs; these agree for vocabularies HF trains, and the agreement is checked
  when the fast path is built (every vocabulary token plus a multi-script probe text) and by
  `verify_fast` on real text (training sample, first encode batch); on a mismatch the tokenizer warns and
  falls back to HF for good.
- char: a code point -> id lookup table in numpy.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from .config import TokenizerConfig
from .errors import UserError

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END = SPECIAL_TOKENS
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# GPT-4 (cl100k) pre-tokenization: contractions, letter runs with one leading non-letter, digit groups of
# at most 3, punctuation runs, newlines, and whitespace that leaves one space to lead the next word.
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# transformers' apply_chat_template with this template reproduces render_chat's text exactly.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_SURROGATE = re.compile("[\ud800-\udfff]")

# Text the fast encoder must reproduce exactly before it is used: contractions in both cases, digit runs,
# whitespace runs before words/digits/punctuation/line ends, and the Unicode classes the split regex tells
# apart (letters of many scripts, marks, numbers that are not ASCII digits, symbols, emoji, controls).
PROBE_TEXT = (
    "It's I'M we'Ve they'LL she'd DON'T 's 'S 'ſ x'ſ\n"
    "  Two  spaces,\tthen tabs\t\t42\n\n\n   \r\n  trailing   \n"
    "12345678 3.14159 1,000,000 ½ ² ٣٤٥ ⅷ १२३ 0x1F\n"
    "naïve café — 日本語のテキスト、한국어 Ελληνικά Русский עברית العربية हिन्दी ไทย\n"
    "e\u0301 a\u0308\u0323 \u200d\ufeff\u00a0x\u2028y\u3000z \U0001F600\U0001F44D\U0001F3FD \U0001F468\u200d\U0001F469\n"
    "<|bos|> <|end|> <|endoftext|> <| |> ((( ))) ... !!! ??? ---- ==> $$$ @@@ ###\n"
    "\x00\x01\x1b[0m\x7f \U0010FFFF \uFFFD end"
)


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode, the byte <-> printable-char map HF's ByteLevel uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _clean(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text)


def _special_added_tokens() -> list[AddedToken]:
    return [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]


VERIFY_BYTES = 256 << 10  # real text the fast encoder must reproduce before use (HF encodes it in ~0.1 s)


def _keep_sample(texts: Iterable[str], sample: list[str], limit: int) -> Iterator[str]:
    """Pass texts through, keeping the first ones (up to `limit` characters) in `sample`."""
    n = 0
    for t in texts:
        if n < limit:
            sample.append(t[: limit - n])
            n += len(sample[-1])
        yield t


def _take_bytes(texts: Iterable[str], limit: int) -> Iterable[str]:
    """Yield texts until `limit` UTF-8 bytes have been given (the last one cut to fit)."""
    left = limit
    for t in texts:
        if left <= 0:
            return
        if not t.isascii():  # (isascii is O(1) in CPython: most English documents skip the cleaning)
            t = _clean(t)
        n = len(t) if t.isascii() else len(t.encode("utf-8"))
        if n > left:
            t = t.encode("utf-8")[:left].decode("utf-8", "ignore")
            n = left
        left -= n
        yield t


def _build_bpe(texts: Iterable[str], cfg: TokenizerConfig) -> HFTokenizer:
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


def _build_char(texts: Iterable[str], cfg: TokenizerConfig) -> HFTokenizer:
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


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _split_even(texts: list[str], n: int) -> list[list[str]]:
    """Cut texts into at most n contiguous runs of about equal character count (order kept)."""
    total = sum(map(len, texts)) or 1
    runs: list[list[str]] = [[]]
    acc = 0
    for t in texts:
        if acc >= total * len(runs) / n and len(runs) < n:
            runs.append([])
        runs[-1].append(t)
        acc += len(t)
    return [r for r in runs if r]


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return bool(b)
    except UnicodeDecodeError:
        return False


def _hf_split_pattern(hf: HFTokenizer) -> str:
    """The split regex a tokenizer.json actually uses (a loaded tokenizer may predate SPLIT_PATTERN changes)."""
    pre = json.loads(hf.to_str()).get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Split" and "Regex" in p.get("pattern", {}):
            return p["pattern"]["Regex"]
    return SPLIT_PATTERN


class Tokenizer:
    """A trained tokenizer: encode/decode text, render chats with loss masks, save/load."""

    def __init__(self, hf: HFTokenizer, kind: str, json_text: str | None = None, chat: dict | None = None):
        """chat: None for chatforge's own format (specials at ids 0..6); for a tokenizer imported with a model,
        {"template", "bos", "eos", "pad", "end_of_turn", "doc", "add_bos"} (ids; see ChatTemplate)."""
        self.kind = kind
        self._json = json_text if json_text is not None else hf.to_str(pretty=True)
        self.hash = hashlib.sha256(self._json.encode("utf-8")).hexdigest()[:16]
        self._hf = hf
        self._hf.encode_special_tokens = True  # "<|end|>" inside text stays text
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.chat = chat
        if chat is None:
            for i, t in enumerate(SPECIAL_TOKENS):
                if hf.token_to_id(t) != i:
                    raise UserError(f"tokenizer has {t} at id {hf.token_to_id(t)}, expected {i}: re-run `chatforge tokenizer`")
            self.bos_id, self.eos_id, self.pad_id, self.system_id, self.user_id, self.assistant_id, self.end_id = range(7)
            self.doc_id, self.add_bos = self.bos_id, True  # documents in shards start with <|bos|>
            self.special_ids = frozenset(range(len(SPECIAL_TOKENS)))
            self.chat_template, self._template = CHAT_TEMPLATE, None
            self._role_id = {"system": self.system_id, "user": self.user_id, "assistant": self.assistant_id}
        else:
            self.bos_id, self.eos_id = chat.get("bos"), chat["eos"]
            self.pad_id, self.end_id, self.doc_id = chat["pad"], chat["end_of_turn"], chat["doc"]
            self.add_bos = bool(chat.get("add_bos")) and self.bos_id is not None
            self.system_id = self.user_id = self.assistant_id = None
            self.special_ids = frozenset(i for i, t in hf.get_added_tokens_decoder().items() if t.special)
            self.chat_template = chat.get("template")
            self._template = ChatTemplate(self) if self.chat_template else None
        self._token_bytes: list[bytes] | None = None
        self._fast = None  # tiktoken Encoding (bpe) or code point lookup table (char), built on first use
        self._fast_state = "unbuilt"  # "unbuilt" | "ready" | "off"
        self.fast_note = ""  # why the fast encoder is off, when it is

    @property
    def native(self) -> bool:
        """True for chatforge's own format (trained here), False for a model's own imported tokenizer."""
        return self.chat is None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a reply: end-of-turn and end-of-sequence (and an imported model's document end)."""
        return tuple(dict.fromkeys(i for i in (self.end_id, self.eos_id, self.doc_id if not self.native else None)
                                   if i is not None))

    def with_bos(self, ids: list[int]) -> list[int]:
        """ids of a plain-text prompt or document as the model saw text in training: BOS first if it adds one."""
        return [self.bos_id, *ids] if self.add_bos else list(ids)

    @property
    def hf(self) -> HFTokenizer:
        """The underlying HF tokenizer (runs with encode_special_tokens=True: specials in text stay text)."""
        return self._hf

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, hash={self.hash!r})"

    # ---- training and persistence -------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], cfg: TokenizerConfig) -> "Tokenizer":
        """Learn a vocabulary from `texts` (at most cfg.max_train_bytes of them), then check the fast encoder
        against HF on the first VERIFY_BYTES of that text (see fast_backend)."""
        if cfg.kind not in ("bpe", "char"):
            raise UserError(f"tokenizer.kind={cfg.kind!r} is not known; use 'bpe' or 'char'")
        sample: list[str] = []
        texts = _keep_sample(_take_bytes(texts, cfg.max_train_bytes), sample, VERIFY_BYTES)
        hf = _build_bpe(texts, cfg) if cfg.kind == "bpe" else _build_char(texts, cfg)
        tok = cls(hf, cfg.kind)
        tok.verify_fast(sample)
        return tok

    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tokenizer.json").write_text(self._json, encoding="utf-8")
        if not self.native:
            self._save_imported(out_dir)
            return
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # the text is byte-exact; no "cleanup" of spaces
            "chat_template": CHAT_TEMPLATE,
        }
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        meta = {"kind": self.kind, "hash": self.hash, "vocab_size": self.vocab_size, "fast_backend": self.fast_backend}
        if self.fast_note:
            meta["fast_note"] = self.fast_note
        (out_dir / "chatforge_tokenizer.json").write_text(json.dumps(meta, indent=2) + "\n")

    def _save_imported(self, out_dir: Path) -> None:
        name = lambda i: self._hf.id_to_token(i) if i is not None else None  # noqa: E731
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_id),
            "eos_token": name(self.end_id),  # a chat model's reply ends at its end-of-turn token
            "pad_token": name(self.pad_id),
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        meta = {"kind": self.kind, "hash": self.hash, "vocab_size": self.vocab_size, "fast_backend": self.fast_backend,
                "fast_note": self.fast_note, "chat": self.chat}
        (out_dir / "chatforge_tokenizer.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, tok_dir: Path) -> "Tokenizer":
        tok_dir = Path(tok_dir)
        path = tok_dir / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"no tokenizer in {tok_dir}: run `chatforge tokenizer` first")
        text = path.read_text(encoding="utf-8")
        meta_path = tok_dir / "chatforge_tokenizer.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        kind = meta.get("kind")
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - HF raises plain Exception for malformed files
            raise UserError(f"{path}: not a valid tokenizer.json ({e}); re-run `chatforge tokenizer`")
        if kind is None:
            kind = "char" if json.loads(text)["model"]["type"] == "WordLevel" else "bpe"
        tok = cls(hf, kind, json_text=text, chat=meta.get("chat"))
        if meta.get("fast_backend") == "hf" and "differ" in meta.get("fast_note", ""):
            tok._disable_fast(meta["fast_note"], warn=False)  # a mismatch seen once is not retried
        return tok

    # ---- encoding -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens added, special-looking text encoded as text."""
        try:
            return self._hf.encode(text, add_special_tokens=False).ids
        except Exception as e:  # noqa: BLE001
            return self._retry([text], e)[0]

    def encode_batch(self, texts: Sequence[str], threads: int = 0) -> list[list[int]]:
        """Like encode, for many texts at once, order kept (fast path when available, see fast_backend)."""
        texts = list(texts)
        if not texts:
            return []
        if self.fast_backend == "hf":
            return self._hf_batch(texts)
        ids, starts = self.encode_documents(texts, threads=threads)
        ends = np.append(starts[1:], len(ids))
        flat = ids.tolist()
        return [flat[a + 1:b] for a, b in zip(starts.tolist(), ends.tolist())]

    def _hf_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            return [e.ids for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]
        except Exception as e:  # noqa: BLE001
            return self._retry(texts, e)

    def encode_documents(self, texts: Sequence[str], threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Encode documents into one flat uint32 array, each document as `<|bos|>` + encode(text), and the
        int64 offset of each document's `<|bos|>`: the layout of a token shard.

        `threads` (0 = every core this process may use) splits the documents into that many contiguous runs
        encoded in parallel; the output does not depend on it.
        """
        texts = list(texts)
        threads = threads or available_cores()
        if threads > 1 and len(texts) > 1 and self.fast_backend != "hf":
            parts = _split_even(texts, threads)
            with ThreadPoolExecutor(len(parts)) as ex:
                arrays = list(ex.map(self._encode_run, parts))
            ids = np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)
        else:
            ids = self._encode_run(texts)
        starts = np.flatnonzero(ids == self.doc_id).astype(np.int64)  # text never encodes to a special id
        assert len(starts) == len(texts), "document count and document-start count disagree"
        return ids, starts

    def _encode_run(self, texts: list[str]) -> np.ndarray:
        """`<|bos|>` + ids of each text, concatenated, with whichever encoder fast_backend names."""
        if not texts:
            return np.zeros(0, np.uint32)
        backend = self.fast_backend
        if backend == "tiktoken":
            return self._tiktoken_run(texts)
        if backend == "lut":
            return self._lut_run(texts)
        docs = self._hf_batch(texts)
        out = np.empty(sum(map(len, docs)) + len(docs), dtype=np.uint32)
        pos = 0
        for d in docs:
            out[pos] = self.doc_id
            out[pos + 1:pos + 1 + len(d)] = d
            pos += 1 + len(d)
        return out

    # ---- fast encoders --------------------------------------------------------------------------
    @property
    def fast_backend(self) -> str:
        """Engine of bulk encoding: "tiktoken" (bpe), "lut" (char), or "hf" (fallback: tiktoken missing, or
        found to disagree with HF; fast_note says which)."""
        if self._fast_state == "unbuilt":
            self._build_fast()
        if self._fast_state == "ready":
            return "tiktoken" if self.kind == "bpe" else "lut"
        return "hf"

    def _disable_fast(self, note: str, warn: bool = True) -> None:
        self._fast, self._fast_state, self.fast_note = None, "off", note
        if warn:
            warnings.warn(f"tokenizer {self.hash}: {note}; bulk encoding falls back to HF tokenizers (slower, "
                          "same ids)", RuntimeWarning, stacklevel=3)

    def _build_fast(self) -> None:
        self._fast_state = "off"
        if not self.native:
            self.fast_note = "a model's own tokenizer: encoded by HF tokenizers"
            return
        if self.kind == "char":
            vocab = self._hf.get_vocab()
            chars = {t: i for t, i in vocab.items() if len(t) == 1}
            lut = np.full(max(map(ord, chars), default=0) + 2, -1, dtype=np.int64)  # last slot: "unknown"
            for c, i in chars.items():
                lut[ord(c)] = i
            self._fast, self._fast_state = lut, "ready"
            return
        try:
            import tiktoken
        except ImportError:
            self.fast_note = "tiktoken is not installed (pip install tiktoken for ~5x faster encoding)"
            return
        tb = self.token_bytes()
        ranks = {b: i for i, b in enumerate(tb) if i >= len(SPECIAL_TOKENS)}
        if len(ranks) != self.vocab_size - len(SPECIAL_TOKENS) or any(bytes([b]) not in ranks for b in range(256)):
            self.fast_note = "the vocabulary lacks some single bytes or has duplicate tokens"
            return
        self._fast = tiktoken.Encoding(f"chatforge-{self.hash}", pat_str=_hf_split_pattern(self._hf),
                                       mergeable_ranks=ranks, special_tokens={t: i for i, t in enumerate(SPECIAL_TOKENS)})
        self._fast_state = "ready"
        # Every token's own text, and text from the corners of Unicode the split regex distinguishes.
        words = [b.decode("utf-8") for b in tb[len(SPECIAL_TOKENS):] if _is_utf8(b)]
        self.verify_fast([PROBE_TEXT, *PROBE_TEXT.split("\n"), *words])

    def verify_fast(self, texts: Sequence[str]) -> bool:
        """Check that the fast encoder gives HF's ids on `texts`; on any difference, warn and use HF from now
        on. Returns whether the fast encoder is (still) in use."""
        texts = [t for t in texts if t]
        if not texts or self.fast_backend == "hf":
            return self.fast_backend != "hf"
        fast = self.encode_documents(texts, threads=1)
        ref = self._hf_batch(texts)
        want = np.fromiter((i for d in ref for i in (self.bos_id, *d)), dtype=np.uint32)
        if not np.array_equal(fast[0], want):
            bad = next(i for i, (t, r) in enumerate(zip(texts, ref)) if self._encode_run([t])[1:].tolist() != r)
            self._disable_fast(f"the {self.fast_backend} encoder and HF tokenizers differ on text "
                               f"{texts[bad][:60]!r}")
            return False
        return True

    def _tiktoken_run(self, texts: list[str]) -> np.ndarray:
        joined = BOS + BOS.join(texts)  # split at the special, so each document is encoded on its own
        if not joined.isascii():
            try:
                joined.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: same cleaning as encode() (tiktoken's own differs)
                texts = [_clean(t) for t in texts]
                joined = BOS + BOS.join(texts)
        enc = self._fast
        if joined.count(BOS) != len(texts):  # a document holds the literal text "<|bos|>": encode each alone
            return np.concatenate([np.concatenate(([self.bos_id], enc.encode_to_numpy(
                t, allowed_special=set(), disallowed_special=()))).astype(np.uint32) for t in texts])
        return enc.encode_to_numpy(joined, allowed_special={BOS}, disallowed_special=())

    def _lut_run(self, texts: list[str]) -> np.ndarray:
        joined = "".join(texts)
        try:
            raw = joined.encode("utf-32-le")
        except UnicodeEncodeError:
            texts = [_clean(t) for t in texts]  # one U+FFFD per surrogate: lengths are unchanged
            raw = "".join(texts).encode("utf-32-le")
        lut = self._fast
        cps = np.frombuffer(raw, dtype=np.uint32)
        ids = lut[np.minimum(cps, len(lut) - 1)]
        if len(ids) and ids.min() < 0:
            c = chr(int(cps[np.flatnonzero(ids < 0)[0]]))
            raise UserError(f"character {c!r} (U+{ord(c):04X}) is not in the char tokenizer's vocabulary; "
                            "retrain it on text that contains it, or use tokenizer.kind=bpe")
        offsets = np.cumsum([0] + [len(t) for t in texts[:-1]])
        return np.insert(ids, offsets, self.bos_id).astype(np.uint32)

    def _retry(self, texts: list[str], err: Exception) -> list[list[int]]:
        """Fix what can be fixed (lone surrogates), or name the character a char tokenizer lacks."""
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode expects str, got {type(t).__name__}") from err
        cleaned = [_clean(t) for t in texts]
        if self.kind == "char":
            vocab = self._hf.get_vocab()
            for t in cleaned:
                for c in t:
                    if c not in vocab:
                        raise UserError(
                            f"character {c!r} (U+{ord(c):04X}) is not in the char tokenizer's vocabulary; "
                            "retrain it on text that contains it, or use tokenizer.kind=bpe")
        if cleaned == texts:
            raise err
        return [e.ids for e in self._hf.encode_batch_fast(cleaned, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str:
        return self._hf.id_to_token(int(i))

    # ---- bytes per token (bits-per-byte metrics and streaming) -------------------------------
    def token_bytes(self) -> list[bytes]:
        """Raw UTF-8 bytes of each token id; b"" for special tokens."""
        if self._token_bytes is None:
            dec = byte_decoder()
            out: list[bytes] = []
            for i in range(self.vocab_size):
                s = self._hf.id_to_token(i)
                if i in self.special_ids or s is None:
                    out.append(b"")
                elif self.kind == "bpe" and all(c in dec for c in s):
                    out.append(bytes(dec[c] for c in s))
                else:
                    out.append(s.encode("utf-8"))
            self._token_bytes = out
        return self._token_bytes

    def token_bytes_lengths(self) -> np.ndarray:
        """UTF-8 byte length of each token id (0 for specials): sum over targets turns nats into bits per byte."""
        return np.array([len(b) for b in self.token_bytes()], dtype=np.int64)

    # ---- chat ---------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Ids and loss mask of a conversation (see module docstring for the format; an imported model's
        conversations go through its own chat template, see ChatTemplate)."""
        check_messages(messages)
        if not self.native:
            return self._chat_template().render_ids(messages, add_generation_prompt)
        ids = [self.bos_id]
        mask = [0]
        for m in messages:
            role, content = m["role"], m["content"]
            body = self.encode(content) if content else []
            learn = 1 if role == "assistant" else 0
            ids += [self._role_id[role], *body, self.end_id]
            mask += [0] + [learn] * len(body) + [learn]
        if add_generation_prompt:
            ids.append(self.assistant_id)
            mask.append(0)
        return ids, mask

    def render_chat_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat as text, exactly what CHAT_TEMPLATE gives (for export and debugging)."""
        if not self.native:
            check_messages(messages)
            return self._chat_template().render(messages, add_generation_prompt)
        parts = [BOS] + [f"{ROLE_TOKENS[m['role']]}{m['content']}{END}" for m in messages]
        if add_generation_prompt:
            parts.append(ASSISTANT)
        return "".join(parts)


    def _chat_template(self) -> "ChatTemplate":
        if self._template is None:
            raise UserError("this model's tokenizer has no chat template: use `generate` (plain text) instead of chat")
        return self._template


def check_messages(messages: list[dict]) -> None:
    """The message list every chat format accepts: role system/user/assistant, string content, system first."""
    for n, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"message {n}: expected {{'role': ..., 'content': ...}}, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLE_TOKENS:
            raise UserError(f"message {n}: role {role!r} is not one of system, user, assistant")
        if not isinstance(content, str):
            raise UserError(f"message {n}: content must be a string, got {type(content).__name__}")
        if role == "system" and n != 0:
            raise UserError(f"message {n}: a system message may only come first")


class ChatTemplate:
    """An imported model's own Jinja chat template, rendered as transformers' apply_chat_template does.

    Ids: the rendered text tokenized with special tokens recognised (as transformers does), so "<|im_end|>"
    typed inside a message is read as the token, as in transformers and llama.cpp. Loss mask: each assistant
    turn's span is the text that rendering the conversation up to that turn adds to rendering the turns
    before it with the generation prompt; the mask covers that span up to and including its end-of-turn
    token (not a newline the template writes after it).
    """

    def __init__(self, tok: "Tokenizer"):
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(tok.chat_template)
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"the model's chat template does not parse: {e}") from None
        name = lambda i: tok.hf.id_to_token(i) if i is not None else None  # noqa: E731
        self._vars = {"bos_token": name(tok.bos_id) or "", "eos_token": name(tok.eos_id) or "",
                      "pad_token": name(tok.pad_id) or ""}
        self._eot = name(tok.end_id) or ""
        self._tok = tok
        self._hf = HFTokenizer.from_str(tok._json)  # specials in the rendered text are read as tokens

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        import jinja2
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self._vars)
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"the model's chat template refused the conversation: {e}") from None

    def render_ids(self, messages: list[dict], add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        text = self.render(messages, add_generation_prompt)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True)
            upto = self.render(messages[:k + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise UserError("the model's chat template does not render a conversation turn by turn, so the "
                                "assistant's tokens cannot be told apart for the loss")
            seg = upto[len(before):]
            j = seg.rfind(self._eot) if self._eot else -1
            spans.append((len(before), len(before) + (j + len(self._eot) if j >= 0 else len(seg))))
        enc = self._hf.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc.offsets]
        if self._tok.add_bos and (not ids or ids[0] != self._tok.bos_id):
            ids, mask = [self._tok.bos_id, *ids], [0, *mask]
        return ids, mask


class IncrementalDecoder:
    """Streaming detokenizer: push ids one by one, get back only complete UTF-8 text.

    A multi-byte character split across tokens is held back until its last byte arrives, so the stream
    never shows U+FFFD for it. Special tokens give "" unless skip_special=False.
    """

    def __init__(self, tok: Tokenizer, skip_special: bool = True):
        self._bytes = tok.token_bytes()
        self._specials = tok.special_ids
        self._tok = tok
        self._skip = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self._specials:
            return "" if self._skip else self._tok.id_to_token(token_id)
        return self._dec.decode(self._bytes[token_id])

    def flush(self) -> str:
        """End of stream: whatever bytes are left (an incomplete character shows as U+FFFD)."""
        return self._dec.decode(b"", final=True)


# ---- compression (bytes per token) -----------------------------------------------------------------

def compression_report(tok: Tokenizer, texts: Iterable[str], max_bytes: int | None = None) -> dict:
    """How much text a token carries on `texts` (e.g. the validation split), cut to `max_bytes` UTF-8 bytes
    the way reference_bytes_per_token cuts its validation text, so the two figures are comparable.

    Returns {"docs", "bytes", "chars", "tokens", "bytes_per_token", "chars_per_token"}; higher is better
    compression (a model sees more text per position).
    """
    docs = list(_take_bytes(texts, max_bytes) if max_bytes else texts)
    ids, starts = tok.encode_documents(docs) if docs else (np.zeros(0), np.zeros(0))
    n_tok = len(ids) - len(starts)  # leave out the <|bos|> before each document
    n_bytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)
    n_chars = sum(map(len, docs))
    return {"docs": len(docs), "bytes": n_bytes, "chars": n_chars, "tokens": n_tok,
            "bytes_per_token": n_bytes / max(n_tok, 1), "chars_per_token": n_chars / max(n_tok, 1)}


def reference_bytes_per_token(train_texts: Iterable[str], val_texts: Iterable[str], vocab_size: int,
                              max_train_bytes: int = 5_000_000, max_val_bytes: int = 5_000_000) -> float:
    """Bytes per token on `val_texts` of the peer library's stock byte-level BPE (HF ByteLevelBPETokenizer:
    GPT-2 split regex, our special tokens, min_frequency 2) trained on `train_texts` with the same vocab size.

    Training text is capped at `max_train_bytes` (about 0.2 CPU-seconds per MB) and validation text at
    `max_val_bytes` (encoded at ~3 MB/s); pass the same cap to compression_report for a like-for-like figure.
    """
    from tokenizers import ByteLevelBPETokenizer

    ref = ByteLevelBPETokenizer()
    ref.train_from_iterator(_take_bytes(train_texts, max_train_bytes), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    val = list(_take_bytes(val_texts, max_val_bytes))
    n_tok = sum(len(e.ids) for e in ref.encode_batch(val)) if val else 0
    n_bytes = sum(len(t.encode("utf-8")) for t in val)
    return n_bytes / max(n_tok, 1)
