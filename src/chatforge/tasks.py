"""Benchmarks: a task registry, schema-checked loaders, multiple-choice and GSM8K scoring, a report card.

Registered tasks read the official evaluation split of their Hugging Face dataset with `datasets` (pinned to
a commit in `REVISIONS`, cached in HF_DATASETS_CACHE / ~/.cache/huggingface/datasets; `datasets` is imported
only when such a task is used). A local file of the same schema (`--task FILE.jsonl --schema hellaswag`) goes
through the same record -> item functions, so both give the same prompts:

    task            dataset                         split        items  schema      suite score
    hellaswag       Rowan/hellaswag                 validation  10,042  hellaswag   acc_norm
    arc_easy        allenai/ai2_arc ARC-Easy        test         2,376  arc         acc_norm
    arc_challenge   allenai/ai2_arc ARC-Challenge   test         1,172  arc         acc_norm
    piqa            baber/piqa (lm-eval's copy)     validation   1,838  piqa        acc_norm
    winogrande      allenai/winogrande xl           validation   1,267  winogrande  acc
    mmlu            cais/mmlu all                   test        14,042  mmlu        acc
    gsm8k           openai/gsm8k main               test         1,319  gsm8k       exact_match

Prompts, item selection (the split's first N items with a limit, as `lm_eval --limit N`) and scoring follow
lm-evaluation-harness 0.4.x zero-shot (`--model hf`): HellaSwag `preprocess(activity_label + ": " + ctx_a + " "
+ ctx_b.capitalize())` with " " + preprocessed endings; ARC and PIQA "Question: {q}\\nAnswer:" with " " + choice;
Winogrande the sentence up to "_" + option as context and " " + the rest as continuation; MMLU its subject
description, question, "A. .."-"D. .." and "Answer:" with " A".." D"; GSM8K "Question: {q}\\nAnswer:",
greedy until "Question:", scored by lm-eval's strict ("#### N") and flexible (last number) filters.

Multiple choice is scored item by item: each choice is a continuation of the context; whitespace at the end of
the context moves to the front of the continuation; context + continuation are encoded together and split
after the context's own tokens; `acc` picks the highest log-likelihood sum, `acc_norm` the highest sum divided
by the choice's length in characters (lm-eval's `len(choice)`, without the " " delimiter), `acc_bytes` by its
length in UTF-8 bytes. Sequences start with BOS when the tokenizer's `add_bos` says the model expects one
(chatforge's own tokenizers do: compare with `lm_eval --model hf --model_args pretrained=DIR,add_bos_token=True`).

More tasks: `register_task` or a benchmarks.yaml, a local file or a Hub dataset per task:

    tasks:
      hellaswag_full: {path: data/hellaswag_val.jsonl, schema: hellaswag}
      arc_easy_val: {dataset: allenai/ai2_arc, name: ARC-Easy, split: validation, revision: main, schema: arc}

`--suite core` scores SUITES["core"] on the first SUITE_ITEMS items of each and reports every task's score,
its random baseline and the centred score (score - baseline) / (1 - baseline), and their mean ("core", as
nanochat's and DCLM's CORE metric).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .task_data import (MULTIPLE_CHOICE, REVISIONS, SCHEMAS, SCORE_METRIC, SUITE_ITEMS, SUITES, TASKS,  # noqa: F401
                        TaskSpec, _normalise, extract_answer, get_task, gsm8k_prompt, hellaswag_preprocess,
                        hub_records, load_benchmarks_yaml, load_items, load_task, normalise_records, register_task,
                        resolve_task)


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
    `len(choice)`; items store each ending as TARGET_DELIMITER + choice)."""
    return len(ending.removeprefix(TARGET_DELIMITER))


def item_pairs(item: dict) -> list[tuple[str, str]]:
    """(context, continuation) per choice: one context and several endings, or (winogrande) one context per
    choice and the same continuation."""
    contexts = item.get("contexts") or [item["context"]] * len(item["endings"])
    return list(zip(contexts, item["endings"]))


def choice_texts(item: dict) -> list[str]:
    """The choices as lm-eval's doc_to_choice gives them (acc_norm divides by their length): the endings
    without the delimiter, or winogrande's contexts."""
    if item.get("contexts"):
        return list(item["contexts"])
    return [e.removeprefix(TARGET_DELIMITER) for e in item["endings"]]


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


def pick(lls: Sequence[float], endings: Sequence[str], choices: Sequence[str] | None = None) -> tuple[int, int]:
    """(pred, pred_norm) from per-choice log-likelihoods: numpy argmax of ll and of ll / len(choice), as
    lm-eval's process_results (first index on ties; an empty choice divides by 0 -> -inf). `choices`: the
    texts whose length divides (default: the endings without the delimiter)."""
    ll = np.asarray(lls, dtype=np.float64)
    lengths = [float(len(c)) for c in choices] if choices is not None else [float(choice_length(e)) for e in endings]
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = ll / np.array(lengths)
    return int(np.argmax(ll)), int(np.argmax(norm))


def score_multiple_choice(model, tok, items: Sequence[dict], device="cpu", max_items: int = 0,
                          batch_size: int = 16, progress: bool = False) -> dict:
    """Zero-shot multiple choice on items from `load_items` / `load_task`.

    Returns acc, acc_norm (log-likelihood / characters of the choice, as lm-eval), acc_bytes (/ UTF-8 bytes),
    each with its standard error (`_se`), random_baseline (mean of 1/choices), n, and `predictions` (per item:
    chosen index by raw and by normalised log-likelihood, the label, and `lls`, each choice's
    log-likelihood). Requests are built by `choice_request` (BOS first when `tok.add_bos`, default True).
    """
    from tqdm.auto import tqdm

    items = list(items)[:max_items] if max_items else list(items)
    if not items:
        raise UserError("no benchmark items to score")
    hits = hits_norm = hits_bytes = 0
    baseline = 0.0
    preds = []
    chunk = max(1, 256 // max(1, len(items[0]["endings"])))  # score many items per pass for batching
    for s in tqdm(range(0, len(items), chunk), desc="multiple choice", disable=not progress, leave=False):
        part = items[s:s + chunk]
        reqs, spans = [], []
        for it in part:
            pairs = item_pairs(it)
            spans.append((len(reqs), len(pairs)))
            reqs += [choice_request(tok, c, e) for c, e in pairs]
        lls = continuation_logprobs(model, reqs, device=device, batch_size=batch_size)
        for it, (a, k) in zip(part, spans):
            ll = lls[a:a + k]
            choices = choice_texts(it)
            pred, pred_norm = pick(ll, it["endings"], choices)
            _, pred_bytes = pick(ll, it["endings"], [c.encode("utf-8") for c in choices])
            hits += pred == it["label"]
            hits_norm += pred_norm == it["label"]
            hits_bytes += pred_bytes == it["label"]
            baseline += 1.0 / k
            preds.append({"pred": pred, "pred_norm": pred_norm, "label": it["label"], "lls": ll})
    n = len(items)
    acc, acc_norm, acc_bytes = hits / n, hits_norm / n, hits_bytes / n
    return {"acc": acc, "acc_se": _stderr(acc, n), "acc_norm": acc_norm, "acc_norm_se": _stderr(acc_norm, n),
            "acc_bytes": acc_bytes, "acc_bytes_se": _stderr(acc_bytes, n),
            "random_baseline": baseline / n, "n": n, "predictions": preds}


# ---- GSM8K ---------------------------------------------------------------------------------------

GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")  # lm-eval's generation_kwargs.until
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-eval gsm8k "strict-match"
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # "flexible-extract", last match
_EM_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")  # exact_match's regexes_to_ignore (then ignore_case)


def _regex_filter(text: str, regex: re.Pattern, group_select: int) -> str:
    """lm-eval's RegexFilter: the selected match (first non-empty group), stripped, else "[invalid]"."""
    found = regex.findall(text)
    if not found:
        return "[invalid]"
    m = found[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), "[invalid]")
    return m.strip()


def _em_normal(s: str) -> str:
    for r in _EM_IGNORE:
        s = re.sub(r, "", s)
    return s.lower()


def gsm8k_match(reply: str, answer: str) -> tuple[bool, bool, str, str]:
    """(strict hit, flexible hit, strict extraction, flexible extraction) of a reply against a GSM8K answer,
    as lm-eval's gsm8k filters and exact_match (regexes_to_ignore, ignore_case) compute them."""
    gold = _em_normal(answer)
    strict, flexible = _regex_filter(reply, _STRICT, 0), _regex_filter(reply, _FLEXIBLE, -1)
    return _em_normal(strict) == gold, _em_normal(flexible) == gold, strict, flexible


def _cut(text: str, until: Sequence[str]) -> str:
    for u in until:  # lm-eval: the continuation up to the first occurrence of each stop string
        if u:
            text = text.split(u)[0]
    return text


def _complete_greedy(engine, prompts: list[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations of plain-text prompts, cut at GSM8K_UNTIL or the tokenizer's stop tokens.
    Prompts too long for the context keep their last tokens (room for at least half the context)."""
    tok = engine.tok
    seq_len = int(getattr(engine, "seq_len", 0) or 1 << 30)
    keep = max(1, seq_len - min(max_new_tokens, seq_len // 2))
    stops = set(getattr(tok, "stop_ids", ()) or ())
    out = []
    for b in range(0, len(prompts), batch_size):
        ids = [engine.complete_prompt(p)[-keep:] for p in prompts[b:b + batch_size]]
        for row in engine.generate(ids, max_new_tokens=max_new_tokens, temperature=0, stop_ids=tuple(stops),
                                   stop_strings=GSM8K_UNTIL):
            row = [t for t in row if t not in stops]
            out.append(_cut(tok.decode(row), GSM8K_UNTIL))
    return out


def score_gsm8k(engine, tok, items: Sequence[dict], max_new_tokens: int = 256, max_items: int = 0,
                progress: bool = False, n_samples: int = 5, chat: bool = False, batch_size: int = 8) -> dict:
    """GSM8K exact match as lm-eval's zero-shot gsm8k: greedy completion of "Question: {q}\\nAnswer:" until
    "Question:", `exact_match` by its strict filter ("#### N"), `exact_match_flexible` by its flexible one
    (the last number). chat=True asks the chat model instead (engine.chat, one question a user turn).

    Returns exact_match, se, exact_match_flexible(_se), random_baseline (0), n and `samples` (the first
    n_samples question/reply/pred/gold records). `tok` is unused beyond the engine's own.
    """
    from tqdm.auto import tqdm

    items = list(items)[:max_items] if max_items else list(items)
    if not items:
        raise UserError("no GSM8K items to score")
    if chat:
        replies = [engine.chat([{"role": "user", "content": it["question"]}], max_new_tokens=max_new_tokens,
                               temperature=0) for it in tqdm(items, desc="gsm8k", disable=not progress, leave=False)]
    else:
        replies = []
        for s in tqdm(range(0, len(items), batch_size), desc="gsm8k", disable=not progress, leave=False):
            part = items[s:s + batch_size]
            replies += _complete_greedy(engine, [it.get("prompt") or gsm8k_prompt(it["question"]) for it in part],
                                        max_new_tokens, batch_size)
    hits = hits_flex = 0
    samples = []
    for it, reply in zip(items, replies):
        strict, flex, pred, pred_flex = gsm8k_match(reply, it["answer"])
        hits += strict
        hits_flex += flex
        if len(samples) < n_samples:
            samples.append({"question": it["question"], "reply": reply, "pred": pred, "pred_flexible": pred_flex,
                            "gold": it.get("gold") or extract_answer(it["answer"])})
    n = len(items)
    em, emf = hits / n, hits_flex / n
    return {"exact_match": em, "se": _stderr(em, n), "exact_match_flexible": emf,
            "exact_match_flexible_se": _stderr(emf, n), "random_baseline": 0.0, "n": n, "samples": samples}


# ---- running tasks, the report card --------------------------------------------------------------

def centred(score: float, baseline: float) -> float:
    """(score - baseline) / (1 - baseline): 0 at chance, 1 at perfect (nanochat's / DCLM's centring)."""
    return (score - baseline) / (1.0 - baseline) if baseline < 1 else float("nan")


def score_items(spec: TaskSpec, items: Sequence[dict], model, tok, *, engine=None, device="cpu",
                max_new_tokens: int = 256, progress: bool = False) -> dict:
    """Score loaded items with the scorer their schema needs; adds metric, score (that metric's value) and
    centered (against random_baseline)."""
    if spec.schema in MULTIPLE_CHOICE:
        res = score_multiple_choice(model, tok, items, device=device, progress=progress)
    else:
        if engine is None:
            from .engine import Engine
            engine = Engine(model, tok, device=device)
        res = score_gsm8k(engine, tok, items, max_new_tokens=max_new_tokens, progress=progress)
    score = float(res[spec.metric])
    return {**res, "metric": spec.metric, "score": score, "centered": centred(score, res["random_baseline"])}


def core_summary(rows: Sequence[dict]) -> dict | None:
    """The report card's last row: the mean centred score of the rows that were scored (skipped ones have
    no `centered`), as nanochat's CORE metric; None when none was."""
    scored = [r for r in rows if isinstance(r.get("centered"), (int, float)) and math.isfinite(r["centered"])]
    if not scored:
        return None
    mean = sum(r["centered"] for r in scored) / len(scored)
    return {"task": "core", "metric": "mean centred", "score": mean, "centered": mean, "tasks": len(scored)}


def run_task(name: str, model, tok, *, engine=None, device="cpu", max_items: int = 0,
             max_new_tokens: int = 256, progress: bool = False) -> dict:
    """Load a registered task and score it; adds `task` to the result."""
    spec = get_task(name)
    items = load_task(name, max_items, spec)
    return {"task": name, **score_items(spec, items, model, tok, engine=engine, device=device,
                                        max_new_tokens=max_new_tokens, progress=progress)}
