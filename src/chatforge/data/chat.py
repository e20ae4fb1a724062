"""Chat data for fine-tuning, in two steps.

Preparing (`prepare_sft`): chat records in any of the common shapes (OpenAI messages, ShareGPT, Alpaca,
prompt/completion, question/answer) -> {"messages": [...]} JSONL, validated, deduplicated, and split by the
hash of the first user message so that no question appears in both splits.

Rendering (`render_examples`): that JSONL -> (ids, loss mask) pairs. mask[i] == 1 means ids[i] is a token the
model should learn to predict (assistant content and the `<|end|>` closing each assistant turn); the trainer
shifts as usual (predict ids[i+1] from ids[:i+1], weight mask[i+1]). A conversation longer than seq_len + 1
tokens (one training window) is cut. too_long="turns" (the default) cuts after the last assistant turn that
fits whole, so every example still ends with the `<|end|>` the model must learn to stop with; one whose first
reply does not fit is dropped. too_long="cut" cuts at the window and keeps the start of a long reply, with no
end to learn.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from ..config import SFTDataConfig
from ..errors import UserError
from .clean import clean_text
from .documents import sha256_file
from .sources import JSON_SUFFIXES, ReadStats, expand_inputs, iter_json_objects
from .stdlib_corpus import stdlib_chat_examples

if TYPE_CHECKING:  # only for annotations: preparing chat data needs no tokenizer
    from ..tokenizer import Tokenizer


# ============================================================================================ preparing

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}
_ROLES = {"system", "user", "assistant"}
_KNOWN_SHAPES = ("messages (OpenAI), conversations (ShareGPT: from/value), instruction/output (Alpaca), "
                 "prompt/completion, question/answer")


class _Skip(Exception):
    """A record that is understood but unusable; the message is the reason counted in the manifest."""


def normalize_chat(rec: Any) -> tuple[str, list[dict]] | None:
    """(format name, messages) for a known record shape; None for an unknown shape. Raises _Skip(reason)."""
    if not isinstance(rec, dict):
        return None
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise _Skip("bad_structure")
        out = []
        for m in msgs:
            role = m.get("role")
            out.append({"role": role.lower() if isinstance(role, str) else role, "content": m.get("content")})
        return "openai", out
    if "conversations" in rec:
        conv = rec["conversations"]
        if not isinstance(conv, list) or not all(isinstance(m, dict) for m in conv):
            raise _Skip("bad_structure")
        out = []
        for m in conv:
            who = m.get("from", m.get("role"))
            role = _SHAREGPT_ROLES.get(who.lower(), who) if isinstance(who, str) else who
            out.append({"role": role, "content": m.get("value", m.get("content"))})
        return "sharegpt", out
    if "instruction" in rec and "output" in rec:
        user = rec["instruction"]
        extra = rec.get("input")
        if isinstance(user, str) and isinstance(extra, str) and extra.strip():
            user = f"{user}\n\n{extra}"
        out = []
        if isinstance(rec.get("system"), str) and rec["system"].strip():
            out.append({"role": "system", "content": rec["system"]})
        history = rec.get("history") or []  # LLaMA-Factory style: [[user, assistant], ...] earlier turns
        if not isinstance(history, list):
            raise _Skip("bad_structure")
        for turn in history:
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
                raise _Skip("bad_structure")
            out += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
        return "alpaca", out
    for q, a, name in (("prompt", "completion", "prompt_completion"), ("question", "answer", "question_answer")):
        if q in rec and a in rec:
            return name, [{"role": "user", "content": rec[q]}, {"role": "assistant", "content": rec[a]}]
    return None


def validate_messages(msgs: list[dict]) -> list[dict]:
    """Cleaned messages, or _Skip(reason): optional leading system turn, then user/assistant alternating,
    ending with the assistant."""
    if not msgs:
        raise _Skip("empty")
    for m in msgs:
        if m["role"] not in _ROLES:
            raise _Skip("bad_role")
        if not isinstance(m["content"], str):
            raise _Skip("non_string_content")
    if not any(m["role"] == "assistant" for m in msgs):
        raise _Skip("no_assistant")
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if not body or any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(body)) \
            or body[-1]["role"] != "assistant":
        raise _Skip("bad_order")
    out = [{"role": m["role"], "content": clean_text(m["content"])} for m in msgs]
    if any(not m["content"] for m in out if m["role"] != "system"):
        raise _Skip("empty_content")
    return out


def _iter_sft_records(cfg: SFTDataConfig, stats: ReadStats) -> Iterator[tuple[Any, str, str, int]]:
    """(record, file label, source, index within file) for every input record."""
    if not cfg.inputs:
        for i, ex in enumerate(stdlib_chat_examples()):
            yield ex, "<python-stdlib-docstrings>", f"stdlib-docstrings:{i + 1}", i
        return
    for path in expand_inputs(cfg.inputs, JSON_SUFFIXES):
        for i, (rec, line) in enumerate(iter_json_objects(path, stats)):
            yield rec, str(path), f"{path}:{line}", i


def _question_hash(msgs: list[dict]) -> bytes:
    first_user = next(m["content"] for m in msgs if m["role"] == "user")
    return hashlib.blake2b(("sft\0" + " ".join(first_user.split())).encode("utf-8"), digest_size=8).digest()


def _progress(it, desc: str, unit: str):
    return tqdm(it, desc=desc, unit=unit, disable=not sys.stderr.isatty(), smoothing=0.1)


def prepare_sft(cfg: SFTDataConfig, out_dir: Path) -> dict:
    """Chat examples -> out_dir/sft_train.jsonl, sft_val.jsonl, sft_manifest.json; returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sft_manifest.json").unlink(missing_ok=True)
    stats = ReadStats(rejects_path=out_dir / "sft_rejects.jsonl")
    (out_dir / "sft_rejects.jsonl").unlink(missing_ok=True)
    skipped: Counter = Counter()
    formats: Counter = Counter()
    examples: list[tuple[bytes, list[dict], str]] = []
    seen: set[bytes] = set()
    usable_in_file: Counter = Counter()
    n_read = 0
    records = _iter_sft_records(cfg, stats)
    try:
        for rec, label, source, idx in _progress(records, "prepare-sft", "example"):
            n_read += 1
            try:
                got = normalize_chat(rec)
                if got is None:
                    if usable_in_file[label] == 0:
                        keys = ", ".join(map(str, rec.keys())) if isinstance(rec, dict) else type(rec).__name__
                        raise UserError(f"{source}: unrecognised chat record with keys [{keys}]; expected one of: "
                                        f"{_KNOWN_SHAPES}")
                    raise _Skip("unknown_format")
                fmt, msgs = got
                msgs = validate_messages(msgs)
            except _Skip as e:
                skipped[str(e)] += 1
                continue
            usable_in_file[label] += 1
            key = hashlib.blake2b(json.dumps(msgs, sort_keys=True).encode(), digest_size=16).digest()
            if key in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(key)
            formats[fmt] += 1
            examples.append((_question_hash(msgs), msgs, source))
            if cfg.max_examples and len(examples) >= cfg.max_examples:
                break
    finally:
        records.close()
        stats.close()
    skipped.update(stats.counts)
    label = ", ".join(cfg.inputs) if cfg.inputs else "the stdlib docstring set"
    if not examples:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "no records found"
        raise UserError(f"no usable chat examples in {label}: {n_read} records read, all skipped ({why})")

    threshold = int(cfg.val_fraction * 2**64)
    in_val = [int.from_bytes(h, "big") < threshold for h, _, _ in examples]
    val_forced = False
    if not any(in_val) and len(examples) >= 2:
        # Move every example sharing the smallest question hash, so a question never sits in both splits
        # (unless that is every example: then there is only one question and nothing to hold out).
        smallest = min(h for h, _, _ in examples)
        candidate = [h == smallest for h, _, _ in examples]
        if not all(candidate):
            in_val, val_forced = candidate, True
    counts = {"train": 0, "val": 0}
    with open(out_dir / "sft_train.jsonl", "w", encoding="utf-8") as ft, \
            open(out_dir / "sft_val.jsonl", "w", encoding="utf-8") as fv:
        for (h, msgs, source), v in zip(examples, in_val):
            (fv if v else ft).write(json.dumps({"messages": msgs, "source": source}, ensure_ascii=False) + "\n")
            counts["val" if v else "train"] += 1
    manifest = {
        "format": "chatforge-sft/1",
        "inputs": list(cfg.inputs) or ["<python-stdlib-docstrings>"],
        "records_read": n_read,
        "counts": counts,
        "formats": dict(sorted(formats.items())),
        "skipped": dict(sorted(skipped.items())),
        "val_forced": val_forced,
        "files": {name: sha256_file(out_dir / name) for name in ("sft_train.jsonl", "sft_val.jsonl")},
        "config": dataclasses.asdict(cfg),
    }
    (out_dir / "sft_manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return manifest


# ============================================================================================ rendering

TOO_LONG = ("turns", "cut")


def render_examples(tok: Tokenizer, path_jsonl: Path, seq_len: int,
                    too_long: str = "turns") -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Render every conversation of a JSONL file; returns the examples and {examples, truncated, dropped,
    tokens, loss_tokens} (truncated: cut to fit; dropped: nothing left to learn after the cut)."""
    if too_long not in TOO_LONG:
        raise UserError(f"finetune.too_long={too_long!r} is not known; use one of {', '.join(TOO_LONG)}")
    path_jsonl = Path(path_jsonl)
    if not path_jsonl.is_file():
        raise UserError(f"no chat data at {path_jsonl}: run `chatforge prepare` first")
    limit = seq_len + 1
    out: list[tuple[list[int], list[int]]] = []
    stats = {"examples": 0, "truncated": 0, "dropped": 0, "tokens": 0, "loss_tokens": 0}
    with open(path_jsonl, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path_jsonl}:{lineno}: not valid JSON ({e.msg}); re-run `chatforge prepare`")
            messages = rec.get("messages") if isinstance(rec, dict) else None
            if not isinstance(messages, list) or not messages:
                raise UserError(f"{path_jsonl}:{lineno}: expected {{\"messages\": [...]}} with at least one message")
            try:
                ids, mask = tok.render_chat(messages)
            except UserError as e:
                raise UserError(f"{path_jsonl}:{lineno}: {e}") from None
            if len(ids) > limit:
                cut = limit
                if too_long == "turns":  # just after the last learned <|end|> inside the window, else nothing
                    cut = next((i + 1 for i in range(limit - 1, -1, -1) if mask[i] and ids[i] == tok.end_id), 0)
                ids, mask = ids[:cut], mask[:cut]
                stats["truncated"] += 1
            if not any(mask):
                stats["dropped"] += 1
                continue
            out.append((ids, mask))
            stats["examples"] += 1
            stats["tokens"] += len(ids)
            stats["loss_tokens"] += sum(mask)
    return out, stats
