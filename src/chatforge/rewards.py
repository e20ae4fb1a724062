"""Verifiable rewards for GRPO (grpo.py): a registry of tasks, each a pool of prompt items and a reward.

finetune.grpo.task names one:
  addition        synthetic two-digit addition, "What is 23 + 58?"; reward 1.0 when the first number in the
                  completion is the sum, else 0.
  copy            copy a short string of letters, "Copy exactly: kqzt"; reward 1.0 when the completion's first
                  word is the string, else 0.
  gsm8k           grade-school maths from a GSM8K-format JSONL in finetune.grpo.prompts ({"question", "answer"},
                  the answer ending "#### 72"); reward 1.0 when the completion's final number equals it.
  FILE.py:FUNC    your own reward FUNC(prompt, completion, **item) -> float on the JSONL in finetune.grpo.prompts
                  ({"prompt": ...} or {"messages": [...]}, plus any fields, which reach FUNC as keywords).
A builtin name may end in ":plain" ("addition:plain"): plain-text prompts ("23+58=", "copy kqzt=") after
<|bos|>, for a pretrained model that has not learned the chat format; otherwise prompts are chat user turns.

An item is a dict: "prompt" (text) or "messages" (a chat), "plain" (bool), and the task's own fields ("answer").
Held-out prompts are disjoint from training prompts: items are ordered by a hash of their prompt text, the first
n distinct prompts are held out and every item with one of those prompts leaves the training pool.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from .errors import UserError

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
COPY_LETTERS = "abcdefghijklmnopqrstuvwxyz"
COPY_LENGTHS = (3, 4, 5)
COPY_POOL = 20000  # distinct strings in the copy task's pool
POOL_SEED = 1234


def _num(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def numbers(text: str) -> list[float]:
    return [v for v in (_num(m) for m in _NUMBER.findall(text)) if v is not None]


# ---------------------------------------------------------------- builtin rewards

def addition_reward(prompt: str, completion: str, answer: float | str = "", **_) -> float:
    """1.0 when the first number in the completion is the answer."""
    got = numbers(completion)
    want = _num(str(answer))
    return 1.0 if got and want is not None and got[0] == want else 0.0


def copy_reward(prompt: str, completion: str, answer: str = "", **_) -> float:
    """1.0 when the completion's first word is the string to copy."""
    words = completion.split()
    return 1.0 if words and words[0] == answer else 0.0


def final_number_reward(prompt: str, completion: str, answer: float | str = "", **_) -> float:
    """GSM8K's rule: the final number of the completion (after "####" when it writes one) equals the answer."""
    if "####" in completion:
        completion = completion.split("####", 1)[1]
        got = numbers(completion)[:1]
    else:
        got = numbers(completion)[-1:]
    want = _num(str(answer))
    return 1.0 if got and want is not None and got[0] == want else 0.0


# ---------------------------------------------------------------- builtin prompt pools

def addition_items(plain: bool) -> list[dict]:
    out = []
    for a in range(10, 100):
        for b in range(10, 100):
            text = f"{a}+{b}=" if plain else f"What is {a} + {b}?"
            out.append({"prompt": text, "plain": plain, "answer": a + b})
    return out


def copy_strings(n: int = COPY_POOL, seed: int = POOL_SEED) -> list[str]:
    """n distinct strings of COPY_LENGTHS letters, the same every time."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    while len(seen) < n:
        k = rng.choice(COPY_LENGTHS)
        seen["".join(rng.choice(COPY_LETTERS) for _ in range(k))] = None
    return list(seen)


def copy_prompt(s: str, plain: bool) -> str:
    return f"copy {s}=" if plain else f"Copy exactly: {s}"


def copy_items(plain: bool) -> list[dict]:
    return [{"prompt": copy_prompt(s, plain), "plain": plain, "answer": s} for s in copy_strings()]


def gsm8k_items(path: Path, plain: bool) -> tuple[list[dict], int]:
    """(items, lines skipped) of a GSM8K-format JSONL: {"question", "answer": "... #### 72"}."""
    items, bad = [], 0
    for rec in read_jsonl(path):
        q, a = rec.get("question"), str(rec.get("answer", ""))
        want = a.split("####")[-1].strip() if "####" in a else a.strip()
        if not isinstance(q, str) or not q.strip() or _num(want) is None:
            bad += 1
            continue
        items.append({"prompt": q.strip(), "plain": plain, "answer": want.replace(",", "")})
    return items, bad


def read_jsonl(path: Path) -> list:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"finetune.grpo.prompts: {path} is not a file; give a JSONL of prompts")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            out.append(rec if isinstance(rec, dict) else {"_bad_line": n})
    return out


def user_items(path: Path, plain: bool) -> tuple[list[dict], int]:
    items, bad = [], 0
    for rec in read_jsonl(path):
        if isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
            items.append({"plain": plain, **rec})
        elif isinstance(rec.get("messages"), list) and rec["messages"]:
            items.append({**rec, "plain": False})
        else:
            bad += 1
    return items, bad


# ---------------------------------------------------------------- the registry

@dataclasses.dataclass
class Task:
    name: str
    reward: Callable[..., float]  # reward(prompt_text, completion_text, **fields) -> float
    items: list[dict]
    skipped_lines: int = 0  # prompt-file lines that were not usable items


BUILTIN = {"addition": addition_reward, "copy": copy_reward, "gsm8k": final_number_reward}


def load_user_reward(spec: str) -> Callable[..., float]:
    """FILE.py:FUNCTION -> the function (the file is imported as a module)."""
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise UserError(f"finetune.grpo.task {spec!r}: {file} is not a file; give FILE.py:FUNCTION")
    mod_spec = importlib.util.spec_from_file_location(f"chatforge_user_reward_{path.stem}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001 - the user's file: say what happened in one line
        raise UserError(f"finetune.grpo.task {spec!r}: importing {file} failed: {type(e).__name__}: {e}") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise UserError(f"finetune.grpo.task {spec!r}: {file} has no function {name!r}")
    try:
        inspect.signature(fn).bind("prompt", "completion")
    except TypeError:
        raise UserError(f"finetune.grpo.task {spec!r}: {name} must take (prompt, completion, **item)") from None
    return fn


def get_task(spec: str, prompts: str = "") -> Task:
    """The task finetune.grpo.task names, with its items (finetune.grpo.prompts when given)."""
    spec = (spec or "").strip()
    if ".py:" in spec:
        if not prompts:
            raise UserError(f"finetune.grpo.task {spec!r} is your own reward: give its prompts as a JSONL in "
                            f"finetune.grpo.prompts ({{\"prompt\": ...}} per line)")
        fn = load_user_reward(spec)
        items, bad = user_items(Path(prompts), plain=False)
        return Task(spec, fn, items, bad)
    name, _, fmt = spec.partition(":")
    if name not in BUILTIN or fmt not in ("", "plain", "chat"):
        raise UserError(f"finetune.grpo.task {spec!r} is not known; use {', '.join(BUILTIN)} (optionally with "
                        f":plain) or FILE.py:FUNCTION")
    plain = fmt == "plain"
    if prompts:
        items, bad = gsm8k_items(Path(prompts), plain) if name == "gsm8k" else user_items(Path(prompts), plain)
        return Task(name, BUILTIN[name], items, bad)
    if name == "gsm8k":
        raise UserError("finetune.grpo.task gsm8k needs its problems: give a GSM8K-format JSONL "
                        "({\"question\", \"answer\": \"... #### 72\"}) in finetune.grpo.prompts")
    return Task(name, BUILTIN[name], addition_items(plain) if name == "addition" else copy_items(plain))


def prompt_text(item: dict) -> str:
    """The text a reward function sees as `prompt`: the item's prompt, or its chat's last user message."""
    if "prompt" in item:
        return str(item["prompt"])
    users = [m.get("content", "") for m in item.get("messages", []) if m.get("role") == "user"]
    return str(users[-1]) if users else ""


def split(items: list[dict], n_eval: int) -> tuple[list[dict], list[dict]]:
    """(train, held_out): the n_eval distinct prompts first by a hash of their text are held out; items sharing
    one of those prompts leave the training pool. The same for the same items, whatever their order."""
    def key(it: dict) -> str:
        return json.dumps(it.get("messages"), sort_keys=True) if "messages" in it else prompt_text(it)

    distinct = sorted({key(it) for it in items}, key=lambda k: hashlib.sha1(k.encode("utf-8")).hexdigest())
    n_eval = max(0, min(n_eval, len(distinct) - 1))
    held = set(distinct[:n_eval])
    train = [it for it in items if key(it) not in held]
    first: dict[str, dict] = {}
    for it in items:
        if key(it) in held:
            first.setdefault(key(it), it)
    return train, [first[k] for k in distinct[:n_eval]]
