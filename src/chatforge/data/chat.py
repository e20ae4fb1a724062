"""Chat examples for fine-tuning: normalised {"messages": [...]} JSONL -> (ids, loss mask) pairs.

mask[i] == 1 means ids[i] is a token the model should learn to predict (assistant content and the `<|end|>`
closing each assistant turn); the trainer shifts as usual (predict ids[i+1] from ids[:i+1], weight mask[i+1]).
A conversation longer than seq_len + 1 tokens (one training window) is cut. too_long="turns" (the default) cuts
after the last assistant turn that fits whole, so every example still ends with the `<|end|>` the model must
learn to stop with; one whose first reply does not fit is dropped. too_long="cut" cuts at the window and keeps
the start of a long reply, with no end to learn.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..tokenizer import Tokenizer


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
