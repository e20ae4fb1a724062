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
"""
from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
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


def _take_bytes(texts: Iterable[str], limit: int) -> Iterable[str]:
    """Yield texts until `limit` UTF-8 bytes have been given (the last one cut to fit)."""
    left = limit
    for t in texts:
        if left <= 0:
            return
        n = len(t.encode("utf-8", "replace"))
        if n > left:
            t = t.encode("utf-8", "replace")[:left].decode("utf-8", "ignore")
            n = left
        left -= n
        yield _clean(t)


def _build_bpe(texts: Iterable[str], cfg: TokenizerConfig) -> HFTokenizer:
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
        show_progress=False,
    )
    tok.train_from_iterator(_take_bytes(texts, cfg.max_train_bytes), trainer=trainer)
    return tok


def _build_char(texts: Iterable[str], cfg: TokenizerConfig) -> HFTokenizer:
    chars: set[str] = set()
    for t in _take_bytes(texts, cfg.max_train_bytes):
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


class Tokenizer:
    """A trained tokenizer: encode/decode text, render chats with loss masks, save/load."""

    def __init__(self, hf: HFTokenizer, kind: str, json_text: str | None = None):
        self.kind = kind
        self._json = json_text if json_text is not None else hf.to_str(pretty=True)
        self.hash = hashlib.sha256(self._json.encode("utf-8")).hexdigest()[:16]
        self._hf = hf
        self._hf.encode_special_tokens = True  # "<|end|>" inside text stays text
        for i, t in enumerate(SPECIAL_TOKENS):
            if hf.token_to_id(t) != i:
                raise UserError(f"tokenizer has {t} at id {hf.token_to_id(t)}, expected {i}: re-run `chatforge tokenizer`")
        self.bos_id, self.eos_id, self.pad_id, self.system_id, self.user_id, self.assistant_id, self.end_id = range(7)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self._role_id = {"system": self.system_id, "user": self.user_id, "assistant": self.assistant_id}
        self._token_bytes: list[bytes] | None = None

    @property
    def hf(self) -> HFTokenizer:
        """The underlying HF tokenizer (runs with encode_special_tokens=True: specials in text stay text)."""
        return self._hf

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, hash={self.hash!r})"

    # ---- training and persistence -------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], cfg: TokenizerConfig) -> "Tokenizer":
        if cfg.kind == "bpe":
            hf = _build_bpe(texts, cfg)
        elif cfg.kind == "char":
            hf = _build_char(texts, cfg)
        else:
            raise UserError(f"tokenizer.kind={cfg.kind!r} is not known; use 'bpe' or 'char'")
        return cls(hf, cfg.kind)

    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tokenizer.json").write_text(self._json, encoding="utf-8")
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
        (out_dir / "chatforge_tokenizer.json").write_text(
            json.dumps({"kind": self.kind, "hash": self.hash, "vocab_size": self.vocab_size}, indent=2) + "\n")

    @classmethod
    def load(cls, tok_dir: Path) -> "Tokenizer":
        tok_dir = Path(tok_dir)
        path = tok_dir / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"no tokenizer in {tok_dir}: run `chatforge tokenizer` first")
        text = path.read_text(encoding="utf-8")
        meta_path = tok_dir / "chatforge_tokenizer.json"
        kind = json.loads(meta_path.read_text())["kind"] if meta_path.is_file() else None
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - HF raises plain Exception for malformed files
            raise UserError(f"{path}: not a valid tokenizer.json ({e}); re-run `chatforge tokenizer`")
        if kind is None:
            kind = "char" if json.loads(text)["model"]["type"] == "WordLevel" else "bpe"
        return cls(hf, kind, json_text=text)

    # ---- encoding -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens added, special-looking text encoded as text."""
        try:
            return self._hf.encode(text, add_special_tokens=False).ids
        except Exception as e:  # noqa: BLE001
            return self._retry([text], e)[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like encode, for many texts at once; HF parallelises this across cores in Rust, order kept."""
        texts = list(texts)
        try:
            return [e.ids for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]
        except Exception as e:  # noqa: BLE001
            return self._retry(texts, e)

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
                if i < len(SPECIAL_TOKENS) or s is None:
                    out.append(b"")
                elif self.kind == "bpe":
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
        """Ids and loss mask of a conversation (see module docstring for the format)."""
        ids = [self.bos_id]
        mask = [0]
        for n, m in enumerate(messages):
            if not isinstance(m, dict):
                raise UserError(f"message {n}: expected {{'role': ..., 'content': ...}}, got {type(m).__name__}")
            role, content = m.get("role"), m.get("content")
            if role not in self._role_id:
                raise UserError(f"message {n}: role {role!r} is not one of system, user, assistant")
            if not isinstance(content, str):
                raise UserError(f"message {n}: content must be a string, got {type(content).__name__}")
            if role == "system" and n != 0:
                raise UserError(f"message {n}: a system message may only come first")
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
        parts = [BOS] + [f"{ROLE_TOKENS[m['role']]}{m['content']}{END}" for m in messages]
        if add_generation_prompt:
            parts.append(ASSISTANT)
        return "".join(parts)


class IncrementalDecoder:
    """Streaming detokenizer: push ids one by one, get back only complete UTF-8 text.

    A multi-byte character split across tokens is held back until its last byte arrives, so the stream
    never shows U+FFFD for it. Special tokens give "" unless skip_special=False.
    """

    def __init__(self, tok: Tokenizer, skip_special: bool = True):
        self._bytes = tok.token_bytes()
        self._tok = tok
        self._skip = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id < len(SPECIAL_TOKENS):
            return "" if self._skip else SPECIAL_TOKENS[token_id]
        return self._dec.decode(self._bytes[token_id])

    def flush(self) -> str:
        """End of stream: whatever bytes are left (an incomplete character shows as U+FFFD)."""
        return self._dec.decode(b"", final=True)
