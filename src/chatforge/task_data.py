"""Benchmark tasks as data: the registry (Hugging Face datasets pinned to a revision, or local files of a
schema), loading with an offline-first cache, and records -> items; tasks.py scores them (see its docstring
for the tasks, splits and lm-evaluation-harness conventions)."""
from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

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
        return {"context": f"Question: {rec['goal']}\nAnswer:",
                "endings": [" " + str(rec["sol1"]), " " + str(rec["sol2"])],
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
                "endings": [" A", " B", " C", " D"],
                "label": _label_index(rec["answer"], 4, bad, "answer", letters=True)}
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

@functools.cache
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
    except Exception as e:  # noqa: BLE001 -- datasets raises many kinds (ConnectionError, ValueError, ...)
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


def gsm8k_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"
