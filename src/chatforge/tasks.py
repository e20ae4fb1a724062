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

import contextlib
import functools
import json
import math
import re
from collections.abc import Iterable, Sequence
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
    "piqa": ("goal", "sol1", "sol2", "label"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "mmlu": ("question", "choices", "answer"),
    "gsm8k": ("question", "answer"),
}
MULTIPLE_CHOICE = ("hellaswag", "arc", "piqa", "winogrande", "mmlu")
# The score a task reports in the suite: lm-eval's acc_norm where it defines one for the task, else acc.
SCORE_METRIC = {"hellaswag": "acc_norm", "arc": "acc_norm", "piqa": "acc_norm", "winogrande": "acc",
                "mmlu": "acc", "gsm8k": "exact_match"}

# Dataset commits on the Hugging Face Hub (`revision=` of datasets.load_dataset): the main branch's commits as
# other public projects pin them (this machine cannot reach the Hub to re-check them). Offline, `datasets` uses
# whatever version of the dataset its cache holds.
REVISIONS = {
    "Rowan/hellaswag": "218ec52e09a7e7462a5400043bb9a69a41d06b76",
    "allenai/ai2_arc": "210d026faf9955653af8916fad021475a3f00453",
    "baber/piqa": "142f6d7367fd9877f0fb3b5734ea6a545f54cdd1",
    "allenai/winogrande": "01e74176c63542e6b0bcb004dcdea22d94fb67b5",
    "cais/mmlu": "c30699e8356da336a370243923dbaf21066bb9fe",
    "openai/gsm8k": "740312add88f781978c0658806c59bc2815b9866",
}


@dataclass(frozen=True)
class HubDataset:
    """One split of a Hugging Face dataset: load_dataset(path, name, split=split, revision=revision)."""
    path: str
    name: str | None
    split: str
    revision: str
    size: int = 0  # items in the split, for the docs

    def describe(self) -> str:
        return f"{self.path}{' ' + self.name if self.name else ''} {self.split} (revision {self.revision[:12]})"

    def fill_command(self) -> str:
        args = ", ".join([repr(self.path)] + ([repr(self.name)] if self.name else [])
                         + [f"split={self.split!r}", f"revision={self.revision!r}"])
        return f'python -c "import datasets; datasets.load_dataset({args})"'


@dataclass(frozen=True)
class TaskSpec:
    path: Path | None  # a local .jsonl/.json file, or None for a Hub dataset
    schema: str
    hub: HubDataset | None = None

    @property
    def metric(self) -> str:
        return SCORE_METRIC[self.schema]

    def source(self) -> str:
        return self.hub.describe() if self.hub else str(self.path)


TASKS: dict[str, TaskSpec] = {}
SUITES: dict[str, tuple[str, ...]] = {
    "core": ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "gsm8k"),
}
SUITE_ITEMS = 100  # items per task in a suite unless --max-items says otherwise


def _check_schema(schema: str, what: str) -> None:
    if schema not in SCHEMAS:
        raise UserError(f"{what}: unknown schema {schema!r}; use one of {', '.join(SCHEMAS)}")


def register_task(name: str, path: str | Path | None = None, schema: str = "", *,
                  hub: HubDataset | None = None) -> TaskSpec:
    """Register a task read from a local file (`path`) or a Hugging Face dataset split (`hub`)."""
    _check_schema(schema, f"benchmark '{name}'")
    if (path is None) == (hub is None):
        raise ValueError("register_task needs exactly one of path and hub")
    spec = TaskSpec(Path(path).expanduser() if path is not None else None, schema, hub)
    TASKS[name] = spec
    return spec


def _hub(path: str, name: str | None, split: str, size: int) -> HubDataset:
    return HubDataset(path, name, split, REVISIONS[path], size)


register_task("hellaswag", schema="hellaswag", hub=_hub("Rowan/hellaswag", None, "validation", 10042))
register_task("arc_easy", schema="arc", hub=_hub("allenai/ai2_arc", "ARC-Easy", "test", 2376))
register_task("arc_challenge", schema="arc", hub=_hub("allenai/ai2_arc", "ARC-Challenge", "test", 1172))
register_task("piqa", schema="piqa", hub=_hub("baber/piqa", None, "validation", 1838))
register_task("winogrande", schema="winogrande", hub=_hub("allenai/winogrande", "winogrande_xl", "validation", 1267))
register_task("mmlu", schema="mmlu", hub=_hub("cais/mmlu", "all", "test", 14042))
register_task("gsm8k", schema="gsm8k", hub=_hub("openai/gsm8k", "main", "test", 1319))


def load_benchmarks_yaml(path: str | Path) -> list[str]:
    """Register the tasks of a benchmarks.yaml (`tasks: {name: {path, schema}}` or {dataset, name, split,
    revision, schema}); returns their names. Relative paths are taken from the YAML file's folder."""
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
        if not isinstance(entry, dict) or "schema" not in entry or ("path" in entry) == ("dataset" in entry):
            raise UserError(f"{path}: task '{name}' needs `schema` ({', '.join(SCHEMAS)}) and either `path` "
                            "(a local file) or `dataset` (a Hugging Face dataset, with `split`)")
        if "dataset" in entry:
            if "split" not in entry:
                raise UserError(f"{path}: task '{name}' needs the `split` of {entry['dataset']}")
            ds = str(entry["dataset"])
            hub = HubDataset(ds, entry.get("name"), str(entry["split"]),
                             str(entry.get("revision") or REVISIONS.get(ds, "main")))
            register_task(str(name), schema=str(entry["schema"]), hub=hub)
        else:
            p = Path(str(entry["path"])).expanduser()
            register_task(str(name), p if p.is_absolute() else path.parent / p, str(entry["schema"]))
        names.append(str(name))
    return names


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"unknown benchmark '{name}'; known: {', '.join(sorted(TASKS))} "
                        "(add one with a benchmarks.yaml, or give a file: --task FILE.jsonl --schema SCHEMA)")
    return TASKS[name]


def resolve_task(task: str, schema: str | None = None) -> tuple[str, TaskSpec]:
    """(display name, spec) of a --task argument: a registered name, or a local file with --schema."""
    if task in TASKS:
        return task, TASKS[task]
    if not Path(task).exists():
        raise UserError(f"unknown task '{task}': give a registered name ({', '.join(TASKS)}) or a JSONL file")
    if not schema:
        raise UserError(f"--schema is needed for the file {task}: {' | '.join(SCHEMAS)}")
    _check_schema(schema, f"--schema for {task}")
    return Path(task).name, TaskSpec(Path(task), schema)


# ---- records -> items (the same for Hub rows and local files) -----------------------------------

def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's hellaswag `preprocess`: the WikiHow half carries markup."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


_hellaswag_clean = hellaswag_preprocess  # the older name


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


def _label_index(value, n: int, bad, field: str, letters: bool = False) -> int:
    if letters and isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        i = ord(value.strip().upper()) - 65
    else:
        try:
            i = int(value)
        except (TypeError, ValueError):
            raise bad(field, f"must be an integer index, got {value!r}")
    if not 0 <= i < n:
        raise bad(field, f"is {value!r}, outside 0..{n - 1}")
    return i


def _normalise(rec: dict, schema: str, where: str) -> dict:
    """One raw record (a Hub row or a file's line) -> the scorer's item; raises UserError naming the place
    and the field. Multiple choice: {context, endings, label} (winogrande: {contexts, endings, label}, one
    context per choice); gsm8k: {question, answer, gold, prompt}."""
    def bad(field: str, why: str) -> UserError:
        return UserError(f"{where}: field '{field}' {why} (schema '{schema}' needs: {', '.join(SCHEMAS[schema])})")

    for f in SCHEMAS[schema]:
        if f not in rec:
            raise bad(f, "is missing")
    if schema == "hellaswag":
        endings = rec["endings"]
        if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
            raise bad("endings", "must be a list of two or more strings")
        label = _label_index(rec["label"], len(endings), bad, "label")
        ctx = rec["ctx"]
        if isinstance(rec.get("ctx_a"), str) and isinstance(rec.get("ctx_b"), str):
            ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()  # lm-eval's process_docs
        if "activity_label" in rec:  # raw rowanz / Hub record: the activity is part of the prompt
            ctx = f"{rec['activity_label']}: {ctx}"
        return {"context": hellaswag_preprocess(str(ctx)),
                "endings": [" " + hellaswag_preprocess(e) for e in endings], "label": label}
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
    if schema == "piqa":
        return {"context": f"Question: {rec['goal']}\nAnswer:", "endings": [" " + str(rec["sol1"]), " " + str(rec["sol2"])],
                "label": _label_index(rec["label"], 2, bad, "label")}
    if schema == "winogrande":
        sentence = str(rec["sentence"])
        if "_" not in sentence:
            raise bad("sentence", "has no '_' blank to fill")
        i = sentence.index("_")
        answer = str(rec["answer"]).strip()
        if answer not in ("1", "2"):
            raise bad("answer", f"must be '1' or '2', got {rec['answer']!r}")
        cont = " " + sentence[i + 1:].strip()  # lm-eval: target_delimiter + doc_to_target
        return {"contexts": [sentence[:i] + str(rec["option1"]), sentence[:i] + str(rec["option2"])],
                "endings": [cont, cont], "label": int(answer) - 1}
    if schema == "mmlu":
        ch = rec["choices"]
        if not isinstance(ch, list) or len(ch) != 4:
            raise bad("choices", "must be a list of four strings")
        subject = str(rec.get("subject") or "")
        desc = f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n" \
            if subject else ""
        q = str(rec["question"]).strip()
        return {"context": desc + f"{q}\nA. {ch[0]}\nB. {ch[1]}\nC. {ch[2]}\nD. {ch[3]}\nAnswer:",
                "endings": [" A", " B", " C", " D"], "label": _label_index(rec["answer"], 4, bad, "answer", letters=True)}
    # gsm8k
    answer = str(rec["answer"])
    if "####" not in answer or extract_answer(answer) is None:
        raise bad("answer", "must end with '#### <number>'")
    return {"question": str(rec["question"]), "answer": answer, "gold": extract_answer(answer),
            "prompt": gsm8k_prompt(str(rec["question"]))}


def normalise_records(records: Iterable[tuple[str, object]], schema: str) -> list[dict]:
    """(where, record) pairs -> items; `where` names the file:line or dataset row in errors."""
    _check_schema(schema, "benchmark")
    items = []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        items.append(_normalise(rec, schema, where))
    return items


def load_items(path: str | Path, schema: str, max_items: int = 0) -> list[dict]:
    """Read a .jsonl (one record a line) or .json (a list of records) benchmark file and check its schema.

    Every record is checked (a bad one is a one-line error naming file and line); the first max_items (0:
    all) come back as items (see `_normalise`).
    """
    path = Path(path)
    if schema not in SCHEMAS:
        raise UserError(f"unknown benchmark schema {schema!r}; use one of {', '.join(SCHEMAS)}")
    if not path.is_file():
        raise UserError(f"benchmark file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
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
    items = normalise_records(records, schema)
    return items[:max_items] if max_items else items


# ---- Hugging Face datasets -----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _hub_reachable(endpoint: str, timeout: float = 4.0) -> bool:
    """Whether the Hub answers at all (one HEAD request, proxies honoured): without it `datasets` retries
    for about 20 s before giving up; with it unreachable we go straight to the cache."""
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # the server answered
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def _offline(on: bool):
    """Hub offline mode for one load (what HF_DATASETS_OFFLINE=1 does at import time): the cache or an error."""
    if not on:
        yield
        return
    import datasets
    import huggingface_hub.constants as hc
    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hc.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hc.HF_HUB_OFFLINE = saved


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def hub_records(name: str, spec: TaskSpec, max_items: int = 0) -> list[tuple[str, dict]]:
    """(where, row) pairs of a Hub task's split (the first max_items; 0: all), from the `datasets` cache or
    the Hub. Without network or cache: a one-line UserError saying how to fill the cache."""
    hub = spec.hub
    local = f"or score a local copy: --task FILE.jsonl --schema {spec.schema}"
    try:
        import datasets
    except ImportError:
        raise UserError(f"task '{name}' reads {hub.path} with the `datasets` package, which is not installed: "
                        f"pip install datasets, {local}")
    env_offline = bool(datasets.config.HF_HUB_OFFLINE)
    offline = env_offline or not _hub_reachable(datasets.config.HF_ENDPOINT)
    try:
        with _offline(offline):
            ds = datasets.load_dataset(hub.path, hub.name, split=hub.split, revision=hub.revision)
    except Exception as e:  # datasets raises many kinds (ConnectionError, FileNotFoundError, ValueError, ...)
        if offline:
            why = "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set" if env_offline else "the Hub is not reachable"
            raise UserError(f"task '{name}': {hub.describe()} is not in the Hugging Face datasets cache and {why}; "
                            f"fill the cache once with network: {hub.fill_command()} (later runs also work with "
                            f"HF_DATASETS_OFFLINE=1), {local}") from None
        raise UserError(f"task '{name}': could not load {hub.describe()} ({_first_line(e)}); {local}") from None
    n = len(ds) if not max_items else min(max_items, len(ds))
    rows = ds.select(range(n)) if n < len(ds) else ds
    return [(f"{hub.path} {hub.split} row {i}", r) for i, r in enumerate(rows.to_list())]


def load_task(name: str, max_items: int = 0, spec: TaskSpec | None = None) -> list[dict]:
    """Items of a registered task (or of `spec`, e.g. from resolve_task): a Hub split or a local file."""
    spec = spec or get_task(name)
    if spec.hub is not None:
        return normalise_records(hub_records(name, spec, max_items), spec.schema)
    return load_items(spec.path, spec.schema, max_items)


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
    `len(choice)`; items store each ending as TARGET_DELIMITER + choice)."""
    return len(ending[len(TARGET_DELIMITER):] if ending.startswith(TARGET_DELIMITER) else ending)


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
    return [e[len(TARGET_DELIMITER):] if e.startswith(TARGET_DELIMITER) else e for e in item["endings"]]


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


def gsm8k_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


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
