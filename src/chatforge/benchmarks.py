"""Benchmarks: a task registry, schema-checked loaders, multiple-choice and GSM8K scoring.

Multiple choice (HellaSwag, ARC) is scored zero-shot exactly as lm-evaluation-harness (0.4.x, `--model hf`)
scores it, item by item: each choice is the continuation " " + ending of the context; whitespace at the end
of the context moves to the front of the continuation; context + continuation are encoded together and
split after the context's own tokens; `acc` picks the highest log-likelihood sum, `acc_norm` the highest sum
divided by the ending's length in characters (`len(ending)`, without the " " delimiter). Sequences start
with BOS when the tokenizer's `add_bos` says the model expects one (chatforge's own tokenizers do: compare
with `lm_eval --model hf --model_args pretrained=DIR,add_bos_token=True`).
GSM8K is generative: the chat model answers each question, and the number after `####` in its reply (or
else its last number) must equal the reference answer's number.

Tasks live in `TASKS` (name -> TaskSpec(path, schema)); add more with `register_task` or a
`benchmarks.yaml`:

    tasks:
      hellaswag_full: {path: data/hellaswag_val.jsonl, schema: hellaswag}
      arc_easy: {path: /data/arc/ARC-Easy-Test.jsonl, schema: arc}
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from .errors import UserError

SCHEMAS: dict[str, tuple[str, ...]] = {
    "hellaswag": ("ctx", "endings", "label"),
    "arc": ("question", "choices", "answerKey"),
    "gsm8k": ("question", "answer"),
}
MULTIPLE_CHOICE = ("hellaswag", "arc")


@dataclass(frozen=True)
class TaskSpec:
    path: Path
    schema: str


def _default_data_root() -> Path:
    # Beside the project checkout (../shared/data) unless the user points elsewhere.
    env = os.environ.get("CHATFORGE_BENCH_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, path: str | Path, schema: str) -> TaskSpec:
    if schema not in SCHEMAS:
        raise UserError(f"benchmark '{name}': unknown schema {schema!r}; use one of {', '.join(SCHEMAS)}")
    spec = TaskSpec(Path(path).expanduser(), schema)
    TASKS[name] = spec
    return spec


register_task("hellaswag", _default_data_root() / "hellaswag" / "hellaswag_val_sample1000_raw.jsonl", "hellaswag")
register_task("gsm8k", _default_data_root() / "gsm8k" / "train.jsonl", "gsm8k")


def load_benchmarks_yaml(path: str | Path) -> list[str]:
    """Register the tasks of a benchmarks.yaml (`tasks: {name: {path, schema}}`); returns their names.

    Relative paths are taken from the YAML file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"benchmarks file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
    tasks = data.get("tasks", data) if isinstance(data, dict) else None
    if not isinstance(tasks, dict) or not tasks:
        raise UserError(f"{path}: expected `tasks:` mapping each name to {{path: ..., schema: ...}}")
    names = []
    for name, entry in tasks.items():
        if not isinstance(entry, dict) or "path" not in entry or "schema" not in entry:
            raise UserError(f"{path}: task '{name}' needs both `path` and `schema` ({', '.join(SCHEMAS)})")
        p = Path(str(entry["path"])).expanduser()
        register_task(str(name), p if p.is_absolute() else path.parent / p, str(entry["schema"]))
        names.append(str(name))
    return names


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"unknown benchmark '{name}'; known: {', '.join(sorted(TASKS))} "
                        "(add one with a benchmarks.yaml)")
    return TASKS[name]


# ---- loading and schema checks -------------------------------------------------------------------

def _hellaswag_clean(text: str) -> str:
    # The WikiHow half of HellaSwag carries markup; lm-evaluation-harness cleans it this way.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _number(text: str) -> str | None:
    """Canonical form of a number ("1,234.50" -> "1234.5"), or None."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    d = d.normalize()
    return format(d, "f") if d == d.to_integral() else str(d)


_NUM = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The number after the last `####` (GSM8K's answer marker), else the last number in the text."""
    if "####" in text:
        m = _NUM.search(text.rsplit("####", 1)[1])
        if m:
            return _number(m.group())
    found = _NUM.findall(text)
    return _number(found[-1]) if found else None


def _normalise(rec: dict, schema: str, where: str) -> dict:
    """One raw record -> the scorer's form; raises UserError naming the place and the field."""
    def bad(field: str, why: str) -> UserError:
        return UserError(f"{where}: field '{field}' {why} (schema '{schema}' needs: {', '.join(SCHEMAS[schema])})")

    for f in SCHEMAS[schema]:
        if f not in rec:
            raise bad(f, "is missing")
    if schema == "hellaswag":
        endings = rec["endings"]
        if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
            raise bad("endings", "must be a list of two or more strings")
        try:
            label = int(rec["label"])
        except (TypeError, ValueError):
            raise bad("label", f"must be an integer index, got {rec['label']!r}")
        if not 0 <= label < len(endings):
            raise bad("label", f"is {label}, outside 0..{len(endings) - 1}")
        ctx = rec["ctx"]
        if isinstance(rec.get("ctx_a"), str) and isinstance(rec.get("ctx_b"), str):
            ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()  # as lm-evaluation-harness builds it
        if "activity_label" in rec:  # raw rowanz record: the activity is part of the prompt (harness, llama.cpp)
            ctx = f"{rec['activity_label']}: {ctx}"
        return {"context": _hellaswag_clean(str(ctx)),
                "endings": [" " + _hellaswag_clean(e) for e in endings], "label": label}
    if schema == "arc":
        ch = rec["choices"]
        if isinstance(ch, dict) and "text" in ch:
            texts = list(ch["text"])
            labels = [str(x) for x in ch.get("label", [chr(65 + i) for i in range(len(texts))])]
        elif isinstance(ch, list) and ch and all(isinstance(c, dict) and "text" in c for c in ch):
            texts = [c["text"] for c in ch]
            labels = [str(c.get("label", chr(65 + i))) for i, c in enumerate(ch)]
        elif isinstance(ch, list) and ch and all(isinstance(c, str) for c in ch):
            texts, labels = list(ch), [chr(65 + i) for i in range(len(ch))]
        else:
            raise bad("choices", "must be {text: [...], label: [...]}, a list of {text, label}, or a list of strings")
        if len(texts) < 2 or len(texts) != len(labels):
            raise bad("choices", "needs two or more texts, one label each")
        key = str(rec["answerKey"]).strip()
        if key not in labels:
            raise bad("answerKey", f"{key!r} is not one of the choice labels {labels}")
        return {"context": f"Question: {rec['question']}\nAnswer:",
                "endings": [" " + str(t) for t in texts], "label": labels.index(key)}
    # gsm8k
    answer = str(rec["answer"])
    if "####" not in answer or extract_answer(answer) is None:
        raise bad("answer", "must end with '#### <number>'")
    return {"question": str(rec["question"]), "answer": answer, "gold": extract_answer(answer)}


def load_items(path: str | Path, schema: str) -> list[dict]:
    """Read a .jsonl (one record a line) or .json (a list of records) benchmark file and check its schema.

    Multiple-choice items come back as {context, endings, label}; gsm8k items as {question, answer, gold}.
    """
    path = Path(path)
    if schema not in SCHEMAS:
        raise UserError(f"unknown benchmark schema {schema!r}; use one of {', '.join(SCHEMAS)}")
    if not path.is_file():
        raise UserError(f"benchmark file {path} not found; register the right path in a benchmarks.yaml")
    text = path.read_text(encoding="utf-8")
    records: list[tuple[str, object]] = []
    if path.suffix == ".json":
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})")
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of records")
        records = [(f"{path} record {i + 1}", r) for i, r in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path} line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n}: not valid JSON ({e.msg}); expected one JSON record a line")
    if not records:
        raise UserError(f"{path}: no records; a {schema} benchmark file needs one JSON record a line")
    items = []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        items.append(_normalise(rec, schema, where))
    return items


# ---- multiple choice -----------------------------------------------------------------------------

def _stderr(p: float, n: int) -> float:
    # Standard error of a mean of n 0/1 outcomes (sample variance, ddof=1).
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def _context_limit(model) -> int:
    cfg = getattr(model, "cfg", None)
    return int(getattr(cfg, "seq_len", 0) or 1 << 30)


@torch.inference_mode()
def continuation_logprobs(model, requests: Sequence[tuple[list[int], list[int]]], device="cpu",
                          batch_size: int = 16) -> list[float]:
    """Sum of log p(continuation | context) for each (context_ids, continuation_ids) request.

    Requests are batched longest-first (little padding; right-padding is invisible to causal attention).
    Contexts are cut from the left when context + continuation exceed the model's context length.
    """
    limit = _context_limit(model)
    was_training = model.training
    model.eval()
    seqs = []
    for ctx, cont in requests:
        if not cont:
            raise ValueError("empty continuation")
        full = (list(ctx) + list(cont))[-(limit + 1):]
        seqs.append((full, min(len(cont), len(full) - 1)))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out = [0.0] * len(seqs)
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = max(len(seqs[i][0]) for i in idx) - 1
            x = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                ids = seqs[i][0][:-1]
                x[r, :len(ids)] = torch.tensor(ids)
            logits = model(x.to(device))
            for r, i in enumerate(idx):
                full, n_cont = seqs[i]
                tgt = torch.tensor(full[-n_cont:], device=logits.device)
                # Normalise only the continuation's rows: a (B, T, V) fp32 log-softmax is large for big vocabs.
                logp = F.log_softmax(logits[r, len(full) - 1 - n_cont:len(full) - 1].float(), dim=-1)
                out[i] = float(logp.gather(1, tgt[:, None]).double().sum())
    finally:
        model.train(was_training)
    return out


TARGET_DELIMITER = " "  # between context and choice, as lm-evaluation-harness's default target_delimiter


def _prefix(tok) -> list[int]:
    """[BOS] when the tokenizer says its model expects one (chatforge tokenizers: always), else []."""
    bos = getattr(tok, "bos_id", None)
    return [bos] if bos is not None and getattr(tok, "add_bos", True) else []


def choice_length(ending: str) -> int:
    """acc_norm's divisor: the choice's length in characters, without the leading delimiter (lm-eval's
    `len(choice)`; load_items stores each ending as TARGET_DELIMITER + choice)."""
    return len(ending[len(TARGET_DELIMITER):] if ending.startswith(TARGET_DELIMITER) else ending)


def choice_request(tok, context: str, ending: str) -> tuple[list[int], list[int]]:
    """(context_ids, continuation_ids) for one choice, split the way lm-evaluation-harness's `_encode_pair`
    splits it for a causal model.

    Trailing whitespace of the context moves to the start of the continuation; context + continuation are
    encoded as one string and the continuation is what follows the context's own token count. An empty
    context is replaced by BOS (EOS if there is none), as lm-eval's `prefix_token_id`.
    """
    if context == "":
        cont = tok.encode(ending)
        bos = getattr(tok, "bos_id", None)
        first = bos if bos is not None else getattr(tok, "eos_id", None)
        if cont and cont[0] == first:
            return cont[:1], cont[1:]
        return [first], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, ending = context[:-n_spaces], context[-n_spaces:] + ending
    ctx = tok.encode(context)
    whole = tok.encode(context + ending)
    return _prefix(tok) + ctx, whole[len(ctx):]


def pick(lls: Sequence[float], endings: Sequence[str]) -> tuple[int, int]:
    """(pred, pred_norm) from per-choice log-likelihoods: numpy argmax of ll and of ll / choice_length,
    as lm-eval's process_results (first index on ties; an empty choice divides by 0 -> -inf)."""
    ll = np.asarray(lls, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = ll / np.array([float(choice_length(e)) for e in endings])
    return int(np.argmax(ll)), int(np.argmax(norm))


def score_multiple_choice(model, tok, items: Sequence[dict], device="cpu", max_items: int = 0,
                          batch_size: int = 16, progress: bool = False) -> dict:
    """Zero-shot multiple choice on items {context, endings, label} (from `load_items`).

    Returns acc, acc_se, acc_norm (log-likelihood / characters of the ending, as lm-eval), acc_norm_se,
    random_baseline (mean of 1/choices), n, and `predictions` (per item: chosen index by raw and by
    normalised log-likelihood, the label, and `lls`, each choice's log-likelihood). Requests are built by
    `choice_request` (BOS first when `tok.add_bos`, default True: chatforge pretraining documents start so).
    """
    from tqdm.auto import tqdm

    items = list(items)[:max_items] if max_items else list(items)
    if not items:
        raise UserError("no benchmark items to score")
    hits = hits_norm = 0
    baseline = 0.0
    preds = []
    chunk = max(1, 256 // max(1, len(items[0]["endings"])))  # score many items per pass for batching
    for s in tqdm(range(0, len(items), chunk), desc="multiple choice", disable=not progress, leave=False):
        part = items[s:s + chunk]
        reqs, spans = [], []
        for it in part:
            spans.append((len(reqs), len(it["endings"])))
            reqs += [choice_request(tok, it["context"], e) for e in it["endings"]]
        lls = continuation_logprobs(model, reqs, device=device, batch_size=batch_size)
        for it, (a, k) in zip(part, spans):
            ll = lls[a:a + k]
            pred, pred_norm = pick(ll, it["endings"])
            hits += pred == it["label"]
            hits_norm += pred_norm == it["label"]
            baseline += 1.0 / k
            preds.append({"pred": pred, "pred_norm": pred_norm, "label": it["label"], "lls": ll})
    n = len(items)
    acc, acc_norm = hits / n, hits_norm / n
    return {"acc": acc, "acc_se": _stderr(acc, n), "acc_norm": acc_norm, "acc_norm_se": _stderr(acc_norm, n),
            "random_baseline": baseline / n, "n": n, "predictions": preds}


# ---- GSM8K ---------------------------------------------------------------------------------------

def score_gsm8k(engine, tok, items: Sequence[dict], max_new_tokens: int = 256, max_items: int = 0,
                progress: bool = False, n_samples: int = 5) -> dict:
    """Greedy chat answers to GSM8K questions; exact match of the extracted number.

    Returns exact_match, se, n and `samples` (the first n_samples question/reply/pred/gold records).
    `tok` is unused beyond the engine's own; it is kept for a uniform scorer signature.
    """
    from tqdm.auto import tqdm

    items = list(items)[:max_items] if max_items else list(items)
    if not items:
        raise UserError("no GSM8K items to score")
    hits = 0
    samples = []
    for it in tqdm(items, desc="gsm8k", disable=not progress, leave=False):
        reply = engine.chat([{"role": "user", "content": it["question"]}], max_new_tokens=max_new_tokens,
                            temperature=0)
        gold = it.get("gold") or extract_answer(it["answer"])
        pred = extract_answer(reply)
        hits += pred is not None and pred == gold
        if len(samples) < n_samples:
            samples.append({"question": it["question"], "reply": reply, "pred": pred, "gold": gold})
    n = len(items)
    em = hits / n
    return {"exact_match": em, "se": _stderr(em, n), "n": n, "samples": samples}


def run_task(name: str, model, tok, *, engine=None, device="cpu", max_items: int = 0,
             max_new_tokens: int = 256, progress: bool = False) -> dict:
    """Load a registered task and score it with the scorer its schema needs; adds `task` to the result."""
    spec = get_task(name)
    items = load_items(spec.path, spec.schema)
    if spec.schema in MULTIPLE_CHOICE:
        res = score_multiple_choice(model, tok, items, device=device, max_items=max_items, progress=progress)
    else:
        if engine is None:
            from .engine import Engine
            engine = Engine(model, tok)
        res = score_gsm8k(engine, tok, items, max_new_tokens=max_new_tokens, max_items=max_items,
                          progress=progress)
    return {"task": name, **res}
