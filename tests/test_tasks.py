"""Benchmarks: registry (Hugging Face splits and local files), formatting as lm-evaluation-harness formats it,
schema errors, multiple-choice and GSM8K scoring, the offline error, and the `--suite` report card.

Nothing here downloads: Hub tasks are either faked (a `datasets` cache built in tmp_path from local records,
or a patched loader), or run offline against an empty cache.
"""
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from chatforge import task_data as td
from chatforge import tasks as bm
from chatforge.config import ModelConfig, TokenizerConfig
from chatforge.errors import UserError
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer

FACTS = "the cat sat on the mat. the dog ran in the park. the bird flew over the tree. "
HELLASWAG_SAMPLE = ("hellaswag", "hellaswag_val_sample1000_raw.jsonl")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([FACTS + "abcdefghijklmnopqrstuvwxyz?:!é\nQA"], TokenizerConfig(kind="char"))


def tiny_gpt(vocab: int, seq_len: int = 48, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_kv_head=2, n_embd=48, seq_len=seq_len, vocab_size=vocab))


@pytest.fixture(scope="module")
def memorised(tok) -> GPT:
    """A tiny GPT trained until it has memorised FACTS (BOS + text, as score_multiple_choice presents it)."""
    model = tiny_gpt(tok.vocab_size)
    stream = [tok.bos_id] + tok.encode(FACTS * 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    T = 40
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and does not fight other processes
    try:
        _train(model, opt, stream, rng, T)
    finally:
        torch.set_num_threads(threads)
    return model


def _train(model, opt, stream, rng, T):
    for _ in range(300):
        starts = [0] + [rng.randrange(0, len(stream) - T - 1) for _ in range(7)]
        x = torch.tensor([stream[s:s + T] for s in starts])
        y = torch.tensor([stream[s + 1:s + T + 1] for s in starts])
        loss = F.cross_entropy(model(x).transpose(1, 2), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3, "the tiny model failed to memorise the text"


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ---- records as the Hub has them (tricky cases on purpose) ----------------------------------------

HELLASWAG_RECS = [
    {"ind": 4, "activity_label": "Roof shingle removal", "ctx_a": "A man is on a roof. [header]", "ctx_b": "he",
     "ctx": "A man is on a roof. [header] he", "endings": ["is [title] here.", "goes  home.", "[step] sits.", "x"],
     "label": "1", "source_id": "s", "split": "val", "split_type": "indomain"},
    {"ind": 5, "activity_label": "Personal Care and Style", "ctx_a": "[header] How to braid hair [title] Comb it.",
     "ctx_b": "", "ctx": "x", "endings": [" Then  braid. ", "Stop [substeps] now.", "Go.", "Wait [title] here."],
     "label": "3", "source_id": "t", "split": "val", "split_type": "zeroshot"},
]
ARC_RECS = [
    {"id": "a1", "question": "Which gas do plants take in?", "answerKey": "B",
     "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]}},
    {"id": "a2", "question": "Numbers as labels?", "answerKey": "3",
     "choices": {"text": ["one", "two", "three"], "label": ["1", "2", "3"]}},
    {"id": "a3", "question": "Five choices, trailing space? ", "answerKey": "E",
     "choices": {"text": ["a", "b", "c", "d", "é e"], "label": ["A", "B", "C", "D", "E"]}},
]
PIQA_RECS = [{"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Push the lid.", "label": 0},
             {"goal": "Dry wet shoes", "sol1": "put them in the oven", "sol2": "stuff them with paper", "label": 1}]
WINOGRANDE_RECS = [
    {"sentence": "The cup did not fit in the box because _ was too big.", "option1": "the cup",
     "option2": "the box", "answer": "1"},
    {"sentence": "Sarah lent Maria money because _ was broke .", "option1": "Sarah", "option2": "Maria",
     "answer": "2"},
]
MMLU_RECS = [
    {"question": " What is 1 + 1? ", "subject": "high_school_mathematics", "choices": ["1", "2", "3", "4"],
     "answer": 1},
    {"question": "Which bone is longest?", "subject": "anatomy", "choices": ["femur", "tibia", "ulna", "rib"],
     "answer": 0},
]
GSM8K_RECS = [{"question": "Janet has 3 eggs and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
              {"question": "A $1,200 bike costs how much?", "answer": "It costs 1,200.\n#### 1,200"}]


def _hellaswag_records(shared: Path | None, n: int = 40) -> list[dict]:
    recs = [dict(r) for r in HELLASWAG_RECS]
    path = shared.joinpath(*HELLASWAG_SAMPLE) if shared else None
    if path is not None and path.is_file():
        recs += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:n]]
    for r in recs:
        r["label"] = str(r["label"])  # the Hub's hellaswag stores labels as strings
    return recs


def _shared_or_none() -> Path | None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"  # as conftest's shared_data fixture
    return shared if shared.is_dir() else None


# ---- formatting: lm-evaluation-harness's own task code on the same records ------------------------

def test_hellaswag_preprocess_is_lm_evals():
    pytest.importorskip("datasets")
    hs_utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    for text in ["A man is on a roof. [header] he", " [title] Wait [title] here.  ", "Stop [substeps] now.",
                 "[step] a  b [x]c", "plain"]:
        assert bm.hellaswag_preprocess(text) == hs_utils.preprocess(text)
    for rec in _hellaswag_records(_shared_or_none()):
        item = bm._normalise(rec, "hellaswag", "rec")
        want = hs_utils.process_docs(__import__("datasets").Dataset.from_list([rec]))[0]
        assert item["context"] == want["query"]
        assert item["endings"] == [" " + c for c in want["choices"]]  # " " = lm-eval's target_delimiter
        assert item["label"] == want["gold"]


LM_EVAL_TASKS = {  # lm-eval task -> (our schema, the records its dataset gets)
    "hellaswag": "hellaswag", "arc_easy": "arc", "arc_challenge": "arc", "piqa": "piqa",
    "winogrande": "winogrande", "mmlu_anatomy": "mmlu", "mmlu_high_school_mathematics": "mmlu", "gsm8k": "gsm8k",
}


@pytest.fixture(scope="module")
def lm_eval_tasks():
    """lm-eval's own task objects (yaml, process_docs, templates), their datasets faked with our records."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    by_path = {"Rowan/hellaswag": _hellaswag_records(_shared_or_none()), "allenai/ai2_arc": ARC_RECS,
               "baber/piqa": PIQA_RECS, "allenai/winogrande": WINOGRANDE_RECS, "cais/mmlu": MMLU_RECS,
               "openai/gsm8k": GSM8K_RECS}
    def fake_load_dataset(path, name=None, **kwargs):
        recs = [r for r in by_path[path] if path != "cais/mmlu" or r["subject"] == name]  # MMLU: per subject
        return datasets.DatasetDict({s: datasets.Dataset.from_list(recs)
                                     for s in ("train", "validation", "test", "dev")})

    with mock.patch.object(datasets, "load_dataset", fake_load_dataset):
        tm = TaskManager()
        names = list(LM_EVAL_TASKS)
        loaded = tm.load(names)["tasks"] if hasattr(tm, "load") else tm.load_task_or_group(names)
    return loaded, by_path


@pytest.mark.parametrize("name", list(LM_EVAL_TASKS))
def test_prompts_and_continuations_are_lm_evals(lm_eval_tasks, name):
    """Every (context, continuation) request and gold label of lm-eval's zero-shot task equals ours."""
    loaded, by_path = lm_eval_tasks
    task = loaded[name]
    schema = LM_EVAL_TASKS[name]
    mmlu = name.startswith("mmlu_")
    spec = bm.TASKS["mmlu" if mmlu else name]
    assert spec.hub.path == task.config.dataset_path and spec.schema == schema
    assert spec.hub.split == (task.config.test_split or task.config.validation_split)
    if not mmlu:  # lm-eval loads MMLU per subject config; the registry reads the "all" config (each row's subject)
        assert spec.hub.name == task.config.dataset_name
    docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
    recs = [r for r in by_path[spec.hub.path] if not mmlu or r["subject"] == task.config.dataset_name]
    assert recs
    assert len(docs) == len(recs)
    for doc, rec in zip(docs, recs):
        item = bm._normalise(dict(rec), schema, name)
        ctx = task.fewshot_context(doc, 0)
        reqs = task.construct_requests(doc, ctx, metadata=(name, 0, 1))
        reqs = reqs if isinstance(reqs, list) else [reqs]
        if schema == "gsm8k":
            assert reqs[0].arguments[0] == item["prompt"]
            assert reqs[0].arguments[1]["until"] == list(bm.GSM8K_UNTIL)
            continue
        assert [tuple(r.arguments) for r in reqs] == bm.item_pairs(item)
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        assert item["label"] == gold
        assert bm.choice_texts(item) == task.doc_to_choice(doc)  # what acc_norm divides by


def test_gsm8k_extraction_is_lm_evals():
    """strict-match / flexible-extract filters and exact_match (regexes_to_ignore, ignore_case) as lm-eval."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    strict = RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)")
    flexible = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    ignore = {"regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"], "ignore_case": True}
    answers = ["work\n#### 72", "so 1,000\n#### 1,000", "#### -3", "#### 0.5", "x\n#### 18"]
    replies = [" 48 + 24 = 72\n#### 72", " It costs $1000.", " #### 1,000.", " -3 apples", " about 0.5",
               " #### 18\n#### 19", " no idea", " 7 then 8 then 18", " $18.00", " ####72", "", " 5.",
               " the answer is 72 dollars.\n\n", " 1,000,000 or #### 1000"]
    for answer in answers:
        for reply in replies:
            s_hit, f_hit, s_pred, f_pred = bm.gsm8k_match(reply, answer)
            (want_s,), = strict.apply([[reply]], [{}])
            (want_f,), = flexible.apply([[reply]], [{}])
            assert (s_pred, f_pred) == (want_s, want_f), reply
            assert s_hit == bool(exact_match_hf_evaluate([want_s], [answer], **ignore)["exact_match"]), (reply, answer)
            assert f_hit == bool(exact_match_hf_evaluate([want_f], [answer], **ignore)["exact_match"]), (reply, answer)


# ---- registered Hub tasks: the datasets cache, the offline error -----------------------------------

def _build_datasets_cache(cache: Path, repo: str, config: str, split: str, revision: str, recs: list[dict]) -> None:
    """A `datasets` cache entry as load_dataset(repo, split=split, revision=revision) leaves it, built from
    local records (this version of datasets' layout: <cache>/<org>___<name>/<config>/0.0.0/<revision>)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    src = cache.parent / "src" / f"{split}.parquet"
    src.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(recs), src)
    org, name = repo.split("/")
    b = Parquet(cache_dir=str(cache.parent / "build"), dataset_name=name, hash=revision, config_name=config,
                data_files={split: str(src)})
    b.download_and_prepare()
    dst = cache / f"{org}___{name}" / config / "0.0.0" / revision
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(b.cache_dir, dst)


def test_registered_task_reads_the_datasets_cache_like_the_local_file(tmp_path, monkeypatch):
    """hellaswag through `datasets` (a cache holding these records, the Hub unreachable) gives exactly the
    items the same records give as a local --task file: one code path for both."""
    datasets = pytest.importorskip("datasets")
    recs = _hellaswag_records(_shared_or_none(), n=30)
    spec = bm.TASKS["hellaswag"]
    cache = tmp_path / "hf" / "datasets"
    try:
        _build_datasets_cache(cache, spec.hub.path, "default", spec.hub.split, spec.hub.revision, recs)
    except Exception as e:  # noqa: BLE001 -- another datasets version lays its cache out otherwise
        pytest.skip(f"could not build a datasets cache with datasets {datasets.__version__}: {e}")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(td, "_hub_reachable", lambda *a, **k: False)
    from_hub = bm.load_task("hellaswag")
    from_file = bm.load_items(write_jsonl(tmp_path / "hs.jsonl", recs), "hellaswag")
    assert from_hub == from_file and len(from_hub) == len(recs)
    assert bm.load_task("hellaswag", max_items=3) == from_file[:3]  # the split's first items, as --limit


def test_importing_tasks_does_not_import_datasets():
    code = "import sys, chatforge.tasks, chatforge.cli, chatforge.use; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def _offline_env(tmp_path) -> dict:
    hf = tmp_path / "hf_empty"
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf),
            "HF_DATASETS_CACHE": str(hf / "datasets"), "HF_HUB_CACHE": str(hf / "hub")}


def test_offline_without_cache_is_a_fast_one_line_error(tmp_path):
    pytest.importorskip("datasets")
    code = ("import time, datasets; from chatforge import tasks; from chatforge.errors import UserError\n"
            "t = time.perf_counter()\n"
            "try:\n    tasks.load_task('hellaswag', 10)\nexcept UserError as e:\n"
            "    print(f'{time.perf_counter() - t:.3f}'); print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=_offline_env(tmp_path), check=False)
    assert out.returncode == 0, out.stderr
    seconds, msg = out.stdout.strip().split("\n")
    assert float(seconds) < 5  # no retries (datasets' own back-off takes about 20 s)
    assert "datasets.load_dataset('Rowan/hellaswag', split='validation', revision=" in msg
    assert "HF_DATASETS_OFFLINE" in msg and "--task FILE.jsonl --schema hellaswag" in msg


# ---- a tiny run for the CLI ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run with a byte-level tokenizer and one pretrain checkpoint (enough for `chatforge eval`)."""
    from chatforge.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("evalrun") / "run"
    Tokenizer.train([FACTS * 3], TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1)).save(root / "tokenizer")
    tok = Tokenizer.load(root / "tokenizer")
    save_checkpoint(root / "pretrain" / "ckpt", 1, tiny_gpt(tok.vocab_size, seq_len=96), None, None, None,
                    {"stage": "pretrain"}, val_loss=1.0)
    return root


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "chatforge", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env, check=False)


def test_cli_offline_task_and_suite_errors(run_dir, tmp_path):
    pytest.importorskip("datasets")
    env = _offline_env(tmp_path)
    r = _cli("eval", run_dir, "--task", "arc_easy", env=env)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert err[-1].startswith("chatforge eval: error: task 'arc_easy'") and "'ARC-Easy', split='test'" in err[-1]
    t = time.perf_counter()
    r = _cli("eval", run_dir, "--suite", "core", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "none of its 6 tasks could be loaded" in r.stderr
    assert time.perf_counter() - t < 90  # six tasks with datasets' retries would take two minutes


def _core_files(tmp_path) -> dict[str, Path]:
    hs = write_jsonl(tmp_path / "hs.jsonl", _hellaswag_records(None) + [
        {"ctx": "the cat sat on the", "endings": ["mat.", "park.", "tree.", "sky."], "label": 0}] * 3)
    arc = write_jsonl(tmp_path / "arc.jsonl", ARC_RECS)
    return {"hellaswag": hs, "arc_easy": arc}


def test_suite_report_card(run_dir, tmp_path, monkeypatch, capsys):
    """--suite core: local stand-ins for two tasks, the other four unloadable (skipped with the reason); the
    rows carry score, baseline and centred score, the core row their mean; `chatforge report` lists them."""
    from chatforge.cli import main

    for name, path in _core_files(tmp_path).items():
        monkeypatch.setitem(bm.TASKS, name, bm.TaskSpec(path, bm.TASKS[name].schema))

    def offline(name, spec, max_items=0):
        raise UserError(f"task '{name}': {spec.hub.describe()} is not in the Hugging Face datasets cache (test)")

    monkeypatch.setattr(td, "hub_records", offline)
    assert main(["eval", str(run_dir), "--suite", "core", "--max-items", "4"]) == 0
    out = capsys.readouterr()
    assert "skipping gsm8k" in out.err and "core" in out.out
    rows = json.loads((run_dir / "eval" / "pretrain_best_suite_core.json").read_text())
    by_task = {r["task"]: r for r in rows}
    assert list(by_task) == ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "gsm8k", "core"]
    for t in ("arc_challenge", "piqa", "winogrande", "gsm8k"):
        assert "not in the Hugging Face datasets cache" in by_task[t]["skipped"] and "score" not in by_task[t]
    hs, arc = by_task["hellaswag"], by_task["arc_easy"]
    assert hs["n"] == 4 and arc["n"] == 3 and hs["metric"] == arc["metric"] == "acc_norm"
    assert hs["random_baseline"] == 0.25 and arc["random_baseline"] == pytest.approx((1 / 4 + 1 / 3 + 1 / 5) / 3)
    for r in (hs, arc):
        assert r["score"] == r["acc_norm"]
        assert r["centered"] == pytest.approx((r["score"] - r["random_baseline"]) / (1 - r["random_baseline"]))
    core = by_task["core"]
    assert core["tasks"] == 2 and core["score"] == pytest.approx((hs["centered"] + arc["centered"]) / 2)
    assert f"core {core['score']:.4f}" in out.out
    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    assert "## Benchmarks" in report and "| pretrain/step_000001 | core |" in report
    assert "| pretrain/step_000001 | arc_easy |" in report


def test_centred_scores_and_core_mean():
    assert bm.centred(0.25, 0.25) == 0 and bm.centred(1.0, 0.25) == 1 and bm.centred(0.1, 0.0) == 0.1
    assert bm.centred(0.0, 0.5) == -1  # below chance is negative
    rows = [{"task": "hellaswag", "score": 0.4, "centered": bm.centred(0.4, 0.25)},  # 0.2
            {"task": "piqa", "score": 0.6, "centered": bm.centred(0.6, 0.5)},  # 0.2
            {"task": "gsm8k", "score": 0.05, "centered": bm.centred(0.05, 0.0)},  # 0.05
            {"task": "winogrande", "skipped": "offline"}]
    core = bm.core_summary(rows)
    assert core["tasks"] == 3 and core["score"] == pytest.approx(0.15) and core["centered"] == core["score"]
    assert bm.core_summary([{"task": "x", "skipped": "offline"}]) is None


def test_suite_max_items_zero_and_file_tasks(run_dir, tmp_path, monkeypatch):
    """A --task file joins the suite; --max-items 0 scores everything; a bad extra file is skipped."""
    for name in bm.SUITES["core"]:
        monkeypatch.setitem(bm.TASKS, name, bm.TaskSpec(_core_files(tmp_path)["arc_easy"], "arc"))
    monkeypatch.setitem(bm.TASKS, "gsm8k", bm.TaskSpec(write_jsonl(tmp_path / "g.jsonl", GSM8K_RECS), "gsm8k"))
    piqa = write_jsonl(tmp_path / "piqa_local.jsonl", PIQA_RECS)
    from chatforge.cli import main
    assert main(["eval", str(run_dir), "--suite", "core", "--max-items", "0", "--task", str(piqa),
                 "--schema", "piqa"]) == 0
    rows = json.loads((run_dir / "eval" / "pretrain_best_suite_core.json").read_text())
    by_task = {r["task"]: r for r in rows}
    assert by_task["piqa_local.jsonl"]["n"] == 2 and by_task["piqa_local.jsonl"]["random_baseline"] == 0.5
    assert by_task["arc_easy"]["n"] == 3 and by_task["gsm8k"]["metric"] == "exact_match"
    assert by_task["gsm8k"]["random_baseline"] == 0 and by_task["core"]["tasks"] == 7


# ---- multiple-choice scoring ----------------------------------------------------------------------

def test_memorised_model_picks_the_right_ending(memorised, tok):
    items = [
        {"context": "the cat sat on the", "endings": [" park.", " mat.", " tree."], "label": 1},
        {"context": "the dog ran in the", "endings": [" park.", " mat.", " tree."], "label": 0},
        {"context": "the bird flew over the", "endings": [" mat.", " park.", " tree."], "label": 2},
        {"context": "the cat", "endings": [" flew over the tree.", " sat on the mat."], "label": 1},
    ]
    res = bm.score_multiple_choice(memorised, tok, items)
    assert res["n"] == 4
    assert res["acc"] == 1.0 and res["acc_norm"] == 1.0 and res["acc_bytes"] == 1.0
    assert res["random_baseline"] == pytest.approx((3 * (1 / 3) + 1 / 2) / 4)


def test_winogrande_items_vary_the_context(memorised, tok):
    """One context per choice and a shared continuation (lm-eval's multiple-input tasks)."""
    item = bm._normalise({"sentence": "the _ sat on the mat.", "option1": "dog", "option2": "cat", "answer": "2"},
                         "winogrande", "w")
    assert bm.item_pairs(item) == [("the dog", " sat on the mat."), ("the cat", " sat on the mat.")]
    res = bm.score_multiple_choice(memorised, tok, [item])
    assert res["acc"] == 1.0 and res["random_baseline"] == 0.5


def independent_loglik(model, tok, context: str, ending: str, move_space: bool = False) -> float:
    if move_space:  # lm-evaluation-harness moves the context's trailing whitespace onto the continuation
        n = len(context) - len(context.rstrip())
        context, ending = context[:len(context) - n], context[len(context) - n:] + ending
    ctx = [tok.bos_id] + tok.encode(context)
    cont = tok.encode(ending)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ctx + cont]))[0].double(), -1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_scores_match_independent_loglikelihood(tok):
    model = tiny_gpt(tok.vocab_size, seed=3)
    with torch.no_grad():  # a sharper random model, so choices differ clearly
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8)
    rng = random.Random(1)
    alphabet = "abcdefghijklmnopqrstuvwxyz "
    items = []
    for _ in range(12):
        endings = [" " + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(4)]
        items.append({"context": "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 20))),
                      "endings": endings, "label": rng.randrange(4)})
    items[1]["context"] += "  "  # trailing spaces move to the continuation (as lm-evaluation-harness)
    # Requests straight through continuation_logprobs (batched, padded) equal one-at-a-time forwards.
    reqs = [([tok.bos_id] + tok.encode(it["context"]), tok.encode(e)) for it in items for e in it["endings"]]
    lls = bm.continuation_logprobs(model, reqs, batch_size=5)
    ref = [independent_loglik(model, tok, it["context"], e) for it in items for e in it["endings"]]
    assert lls == pytest.approx(ref, rel=1e-5, abs=1e-5)

    ref = [independent_loglik(model, tok, it["context"], e, move_space=True) for it in items for e in it["endings"]]
    res = bm.score_multiple_choice(model, tok, items, batch_size=7)
    hits = hits_norm = 0
    for i, (it, pred) in enumerate(zip(items, res["predictions"])):
        ll = ref[4 * i:4 * i + 4]
        assert pred["lls"] == pytest.approx(ll, rel=1e-5, abs=1e-5)
        norm = [v / len(e[1:]) for v, e in zip(ll, it["endings"])]  # characters, without the " " delimiter
        assert pred["pred"] == max(range(4), key=ll.__getitem__)
        assert pred["pred_norm"] == max(range(4), key=norm.__getitem__)
        hits += pred["pred"] == it["label"]
        hits_norm += pred["pred_norm"] == it["label"]
    assert res["acc"] == hits / 12 and res["acc_norm"] == hits_norm / 12
    assert any(p["pred"] != p["pred_norm"] for p in res["predictions"])  # normalisation matters here
    assert res["acc_se"] == pytest.approx((res["acc"] * (1 - res["acc"]) / 11) ** 0.5)


def test_long_context_is_cut_from_the_left(memorised, tok):
    long_ctx = "the dog ran in the park. " * 5 + "the cat sat on the"  # longer than seq_len 48
    item = {"context": long_ctx, "endings": [" park.", " mat."], "label": 1}
    res = bm.score_multiple_choice(memorised, tok, [item])
    assert res["n"] == 1 and res["acc"] == 1.0


# ---- local files: schemas and bad input -----------------------------------------------------------

def test_wrong_schema_names_file_line_and_field(tmp_path):
    good = {"ctx": "a", "endings": ["b", "c"], "label": 0}
    path = write_jsonl(tmp_path / "hs.jsonl", [good, {"ctx": "a", "ending": ["b"], "label": 0}])
    with pytest.raises(UserError) as e:
        bm.load_items(path, "hellaswag")
    msg = str(e.value)
    assert str(path) in msg and "line 2" in msg and "'endings'" in msg and "missing" in msg

    path = write_jsonl(tmp_path / "lab.jsonl", [good, good, {"ctx": "a", "endings": ["b", "c"], "label": 5}])
    with pytest.raises(UserError, match=r"line 3: field 'label' is 5"):
        bm.load_items(path, "hellaswag")

    path = write_jsonl(tmp_path / "bad.jsonl", [good, "{not json"])
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        bm.load_items(path, "hellaswag")

    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(UserError, match=r"line 1: field 'answer'"):
        bm.load_items(path, "gsm8k")

    with pytest.raises(UserError, match="unknown benchmark schema 'squad'.*hellaswag, arc, piqa, winogrande, mmlu"):
        bm.load_items(path, "squad")
    with pytest.raises(UserError, match="unknown schema 'squad'"):
        bm.resolve_task(str(path), "squad")

    wino = write_jsonl(tmp_path / "w.jsonl", [{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}])
    with pytest.raises(UserError, match=r"line 1: field 'sentence' has no '_'"):
        bm.load_items(wino, "winogrande")
    mmlu = write_jsonl(tmp_path / "m.jsonl", [dict(MMLU_RECS[0], choices=["a", "b"])])
    with pytest.raises(UserError, match=r"line 1: field 'choices' must be a list of four"):
        bm.load_items(mmlu, "mmlu")
    piqa = write_jsonl(tmp_path / "p.jsonl", [dict(PIQA_RECS[0], label=2)])
    with pytest.raises(UserError, match=r"line 1: field 'label' is 2, outside 0..1"):
        bm.load_items(piqa, "piqa")


def test_empty_or_missing_file_is_a_user_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="no records"):
        bm.load_items(empty, "arc")
    with pytest.raises(UserError, match="not found"):
        bm.load_items(tmp_path / "nope.jsonl", "arc")
    with pytest.raises(UserError, match="--schema is needed"):
        bm.resolve_task(str(empty))
    with pytest.raises(UserError, match="unknown task 'nope'"):
        bm.resolve_task("nope")


def test_arc_choice_layouts(tmp_path):
    recs = [
        {"question": "2+2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B"},
        {"question": "sky?", "choices": [{"text": "blue", "label": "1"}, {"text": "red", "label": "2"}],
         "answerKey": "1"},
        {"question": "x?", "choices": ["p", "q", "r"], "answerKey": "C"},
    ]
    items = bm.load_items(write_jsonl(tmp_path / "arc.jsonl", recs), "arc")
    assert [it["label"] for it in items] == [1, 0, 2]
    assert items[0]["context"] == "Question: 2+2?\nAnswer:" and items[0]["endings"] == [" 3", " 4"]
    bad = write_jsonl(tmp_path / "arc_bad.jsonl", [dict(recs[0], answerKey="E")])
    with pytest.raises(UserError, match="answerKey"):
        bm.load_items(bad, "arc")
    as_json = tmp_path / "arc.json"
    as_json.write_text(json.dumps(recs))
    assert len(bm.load_items(as_json, "arc")) == 3
    assert len(bm.load_items(as_json, "arc", max_items=2)) == 2


def test_hellaswag_raw_record_cleanup(tmp_path):
    rec = {"activity_label": "Roof shingle removal", "ctx": "A man is on a roof. [header] he",
           "ctx_a": "A man is on a roof. [header]", "ctx_b": "he", "endings": ["is [title] here.", "goes  home."],
           "label": 1}
    (item,) = bm.load_items(write_jsonl(tmp_path / "h.jsonl", [rec]), "hellaswag")
    # As lm-evaluation-harness: activity_label + ": " + ctx_a + " " + ctx_b.capitalize(), then cleaned.
    assert item["context"] == "Roof shingle removal: A man is on a roof. He"
    assert item["endings"] == [" is. here.", " goes home."]
    del rec["ctx_a"], rec["ctx_b"]  # a record with only ctx keeps it as it is
    (item,) = bm.load_items(write_jsonl(tmp_path / "h2.jsonl", [rec]), "hellaswag")
    assert item["context"] == "Roof shingle removal: A man is on a roof. he"


def test_mmlu_prompt(tmp_path):
    (item,) = bm.load_items(write_jsonl(tmp_path / "m.jsonl", [MMLU_RECS[0]]), "mmlu")
    assert item["context"] == ("The following are multiple choice questions (with answers) about high school "
                               "mathematics.\n\nWhat is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert item["endings"] == [" A", " B", " C", " D"] and item["label"] == 1
    (item,) = bm.load_items(write_jsonl(tmp_path / "m2.jsonl", [dict(MMLU_RECS[1], answer="C")]), "mmlu")
    assert item["label"] == 2  # a letter answer is accepted too


def test_shared_hellaswag_sample(shared_data, tok):
    items = bm.load_items(shared_data.joinpath(*HELLASWAG_SAMPLE), "hellaswag")
    assert len(items) == 1000 and all(len(it["endings"]) == 4 for it in items)
    assert all("[" not in it["context"] for it in items[:100])
    char = Tokenizer.train([it["context"] + "".join(it["endings"]) for it in items[:20]],
                           TokenizerConfig(kind="char"))
    res = bm.score_multiple_choice(tiny_gpt(char.vocab_size, seq_len=256), char, items, max_items=8)
    assert res["n"] == 8 and res["random_baseline"] == pytest.approx(0.25)


# ---- GSM8K --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,num", [
    ("so she has 5 apples.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("the answer is $18.00.", "18"),
    ("first 3 then 4.5 and finally -7", "-7"),
    ("no number here", None),
    ("#### 0.50", "0.5"),
])
def test_extract_answer(text, num):
    assert bm.extract_answer(text) == num


class ScriptedEngine:
    """Engine.complete_prompt/generate stand-in: each prompt's reply is scripted (scoring logic only)."""

    seq_len = 10_000
    stop_ids = (0,)

    def __init__(self, replies: dict[str, str]):
        self.replies, self.prompts, self.calls = replies, [], []
        self.tok = self

    def complete_prompt(self, text):
        self.prompts.append(text)
        return [1, 1000 + len(self.prompts) - 1]

    def generate(self, ids, max_new_tokens, temperature, stop_ids, stop_strings):
        self.calls.append((len(ids), max_new_tokens, temperature, stop_ids, stop_strings))
        return [[row[-1], 0] for row in ids]  # the reply's "token", then a stop id

    def decode(self, row):
        (i,) = row
        return self.replies[self.prompts[i - 1000]]


def test_gsm8k_completion_prompt_and_exact_match(tmp_path):
    recs = [{"question": f"q{i}", "answer": f"work...\n#### {a}"} for i, a in enumerate(["72", "1,000", "5", "9"])]
    items = bm.load_items(write_jsonl(tmp_path / "g.jsonl", recs), "gsm8k")
    engine = ScriptedEngine({"Question: q0\nAnswer:": " 48+24 = 72\n#### 72\n\nQuestion: what next? #### 1",
                             "Question: q1\nAnswer:": " It costs $1000.",
                             "Question: q2\nAnswer:": " #### 6 (not 5)",
                             "Question: q3\nAnswer:": " I do not know"})
    res = bm.score_gsm8k(engine, None, items, max_new_tokens=64, batch_size=3)
    assert res["n"] == 4 and res["exact_match"] == 0.25 and res["exact_match_flexible"] == 0.75
    assert [s["pred"] for s in res["samples"]] == ["72", "[invalid]", "6", "[invalid]"]
    assert [s["pred_flexible"] for s in res["samples"]] == ["72", "$1000.", "5", "[invalid]"]
    assert res["samples"][0]["reply"] == " 48+24 = 72\n#### 72\n\n"  # cut at "Question:", as lm-eval's until
    assert [c[0] for c in engine.calls] == [3, 1]
    assert all(c[1] == 64 and c[2] == 0 and c[4] == bm.GSM8K_UNTIL for c in engine.calls)
    assert res["random_baseline"] == 0
    assert bm.score_gsm8k(engine, None, items, max_items=1)["n"] == 1


class LookupEngine:
    """Engine.chat stand-in that replies from a table."""

    def __init__(self, replies: dict[str, str]):
        self.replies = replies
        self.calls = []

    def chat(self, messages, max_new_tokens, temperature=0):
        self.calls.append((messages, max_new_tokens, temperature))
        return self.replies[messages[-1]["content"]]


def test_gsm8k_chat_mode():
    items = [{"question": "q0", "answer": "#### 72"}, {"question": "q1", "answer": "#### 3"}]
    engine = LookupEngine({"q0": "48+24 = 72\n#### 72", "q1": "maybe 3"})
    res = bm.score_gsm8k(engine, None, items, max_new_tokens=32, chat=True)
    assert res["exact_match"] == 0.5 and res["exact_match_flexible"] == 1.0  # "maybe 3": the last number
    assert all(c[1] == 32 and c[2] == 0 for c in engine.calls)


def test_gsm8k_with_real_engine(tok):
    from chatforge.engine import Engine

    model = tiny_gpt(tok.vocab_size, seq_len=64)
    items = [{"question": "the cat sat on the mat? " * 6, "answer": "#### 3", "gold": "3"},  # longer than half
             {"question": "the dog?", "answer": "#### 4", "gold": "4"}]
    res = bm.score_gsm8k(Engine(model, tok), tok, items, max_new_tokens=8)
    assert res["n"] == 2 and all(isinstance(s["reply"], str) for s in res["samples"])


# ---- the registry -------------------------------------------------------------------------------

def test_registry_and_yaml(tmp_path):
    data = write_jsonl(tmp_path / "mine.jsonl", [{"ctx": "a", "endings": ["b", "c"], "label": 0}])
    cfg = tmp_path / "benchmarks.yaml"
    cfg.write_text("tasks:\n  mine: {path: mine.jsonl, schema: hellaswag}\n"
                   "  arc_val: {dataset: allenai/ai2_arc, name: ARC-Easy, split: validation, schema: arc}\n")
    try:
        assert bm.load_benchmarks_yaml(cfg) == ["mine", "arc_val"]
        assert bm.TASKS["mine"] == bm.TaskSpec(data, "hellaswag")
        assert bm.TASKS["arc_val"].hub == td.HubDataset("allenai/ai2_arc", "ARC-Easy", "validation",
                                                         bm.REVISIONS["allenai/ai2_arc"])
        with pytest.raises(UserError, match="unknown benchmark 'nope'"):
            bm.get_task("nope")
        cfg.write_text("tasks:\n  other: {path: x.jsonl, schema: squad}\n")
        with pytest.raises(UserError, match="unknown schema 'squad'"):
            bm.load_benchmarks_yaml(cfg)
    finally:
        bm.TASKS.pop("mine", None)
        bm.TASKS.pop("arc_val", None)


def test_registered_tasks_are_official_eval_splits_pinned():
    want = {"hellaswag": ("Rowan/hellaswag", None, "validation"),
            "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
            "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
            "piqa": ("baber/piqa", None, "validation"),
            "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
            "mmlu": ("cais/mmlu", "all", "test"),
            "gsm8k": ("openai/gsm8k", "main", "test")}
    for name, (path, config, split) in want.items():
        hub = bm.TASKS[name].hub
        assert (hub.path, hub.name, hub.split) == (path, config, split)
        assert len(hub.revision) == 40 and int(hub.revision, 16) >= 0  # a commit, not a branch
        assert bm.TASKS[name].path is None  # nothing points into a development checkout
    assert set(bm.SUITES["core"]) <= set(bm.TASKS)
