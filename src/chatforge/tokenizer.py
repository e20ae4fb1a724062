"""The tokenizer: encode/decode text, render chats with loss masks, save/load (vocabulary training is in
tokenizer_train.py, the chat format and special tokens in chat_format.py).

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
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from .chat_format import (ASSISTANT, BOS, CHAT_TEMPLATE, END, EOS, PAD, ROLE_TOKENS, SPECIAL_TOKENS, SYSTEM, USER,
                          ChatTemplate, check_messages)
from .config import TokenizerConfig
from .errors import UserError
from .tokenizer_train import SPLIT_PATTERN, build_bpe, build_char, keep_sample, replace_surrogates, take_bytes

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


VERIFY_BYTES = 256 << 10  # real text the fast encoder must reproduce before use (HF encodes it in ~0.1 s)


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def split_even(texts: list[str], n: int) -> list[list[str]]:
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
        texts = keep_sample(take_bytes(texts, cfg.max_train_bytes), sample, VERIFY_BYTES)
        hf = build_bpe(texts, cfg) if cfg.kind == "bpe" else build_char(texts, cfg)
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
            parts = split_even(texts, threads)
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
                texts = [replace_surrogates(t) for t in texts]
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
            texts = [replace_surrogates(t) for t in texts]  # one U+FFFD per surrogate: lengths are unchanged
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
        cleaned = [replace_surrogates(t) for t in texts]
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
        """Ids and loss mask of a conversation (the format is described in chat_format.py; an imported model's
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

    def _chat_template(self) -> ChatTemplate:
        if self._template is None:
            raise UserError("this model's tokenizer has no chat template: use `generate` (plain text) instead of chat")
        return self._template


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
    the way tokenizer_train.reference_bytes_per_token cuts its validation text, so the two figures are comparable.

    Returns {"docs", "bytes", "chars", "tokens", "bytes_per_token", "chars_per_token"}; higher is better
    compression (a model sees more text per position).
    """
    docs = list(take_bytes(texts, max_bytes) if max_bytes else texts)
    ids, starts = tok.encode_documents(docs) if docs else (np.zeros(0), np.zeros(0))
    n_tok = len(ids) - len(starts)  # leave out the <|bos|> before each document
    n_bytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)
    n_chars = sum(map(len, docs))
    return {"docs": len(docs), "bytes": n_bytes, "chars": n_chars, "tokens": n_tok,
            "bytes_per_token": n_bytes / max(n_tok, 1), "chars_per_token": n_chars / max(n_tok, 1)}
