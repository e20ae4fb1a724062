"""Stages that read a run's model: eval, generate, chat, serve, export, embeddings.

`--stage auto` picks the run's latest model (fine-tuned, else pretrained, else imported); in a demo run,
chat/serve/export/generate use the model the demo picked (RUN/chat_model.json).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .config import Config
from .distributed import pick_device
from .errors import UserError
from .machine import choose_precision
from .paths import RunPaths

STAGE_DIRS = {"finetune": "finetune", "pretrain": "pretrain", "import": "imported"}
CHAT_MODEL = "chat_model.json"  # in a demo run: which of its models chat/serve/export/generate use
METRIC_COLUMNS = ["model", "split", "loss", "ppl", "acc", "top5", "bpb", "tokens"]


def stage_dir(paths: RunPaths, stage: str) -> Path:
    if stage == "auto":  # the latest model of the run: fine-tuned, else pretrained, else imported
        stage = next((s for s in STAGE_DIRS if (getattr(paths, STAGE_DIRS[s]) / "ckpt").exists()), "pretrain")
    d = getattr(paths, STAGE_DIRS[stage])
    RunPaths.need(d / "ckpt", stage)
    return d


def load_run_model(paths: RunPaths, stage: str, which: str, device="cpu"):
    """(model, meta, checkpoint dir) of a run's stage ('auto' | pretrain | finetune | import) and checkpoint."""
    from .checkpoint import load_model, resolve_checkpoint
    ckpt = resolve_checkpoint(stage_dir(paths, stage) / "ckpt", which)
    model, meta = load_model(ckpt, device=device)
    return model, meta, ckpt


def chat_paths(paths: RunPaths, stage: str) -> RunPaths:
    """The run whose model is used: with --stage auto, a demo run's pick (RUN/chat_model.json), else the run."""
    pick = paths.root / CHAT_MODEL
    if stage == "auto" and pick.is_file():
        sub = json.loads(pick.read_text()).get("run")
        if sub:
            return RunPaths(paths.root / sub)
    return paths


def engine(cfg: Config, paths: RunPaths, stage: str, which: str):
    from .engine import Engine
    from .tokenizer import Tokenizer
    paths = chat_paths(paths, stage)
    model, _, _ = load_run_model(paths, stage, which)
    g = cfg.generate
    eng = Engine(model, Tokenizer.load(paths.tokenizer), device=g.device, weights=g.weights, precision=g.precision)
    print(f"precision: {eng.precision_why}", file=sys.stderr)  # stderr: generate's stdout is the text alone
    return eng


# ---------------------------------------------------------------- eval

def evaluate_splits(model, tok, paths: RunPaths, cfg: Config, progress: bool = False) -> dict:
    """Metrics on both validation sets: pretraining text and the chat fine-tuning set."""
    import numpy as np

    from .data.loader import iter_eval_batches, iter_sft_eval_batches, n_eval_batches
    from .data.shards import token_arrays
    from .evaluate import evaluate_lm
    from .finetune import sft_examples

    seq_len = model.cfg.seq_len
    token_bytes = np.asarray(tok.token_bytes_lengths())
    device = pick_device(cfg.generate.device)
    precision = choose_precision(device, cfg.train.precision, model.cfg.n_embd)[0]
    model.to(device)
    out = {}
    sft_val = paths.data / "sft_val.jsonl"
    if not (paths.tokens / "val").is_dir() and not sft_val.exists():
        raise UserError(f"{paths.root} has no validation split (an imported model?): evaluate with --file TEXT or "
                        f"--task NAME, or build one with `chatforge prepare` and `chatforge encode`")
    if (paths.tokens / "val").is_dir() or not sft_val.exists():
        val = token_arrays(paths.tokens / "val", tok)
        bs, cap = cfg.eval.batch_size, cfg.eval.max_batches
        out["text val"] = evaluate_lm(model, iter_eval_batches(val, bs, seq_len, max_batches=cap),
                                      token_bytes=token_bytes, device=device, precision=precision,
                                      progress=progress and "eval text val", total=n_eval_batches(val, bs, seq_len, cap))
    if sft_val.exists():
        ex, _ = sft_examples(tok, sft_val, seq_len)
        out["chat val"] = evaluate_lm(model, iter_sft_eval_batches(ex, cfg.eval.batch_size, seq_len, pad_id=tok.pad_id),
                                      token_bytes=token_bytes, device=device, precision=precision,
                                      progress=progress and "eval chat val", total=-(-len(ex) // cfg.eval.batch_size))
    return out


def metric_rows(label: str, results: dict) -> list[dict]:
    return [{"model": label, "split": split, **m} for split, m in results.items()]


def run_eval(cfg: Config, paths: RunPaths, stage: str = "auto", which: str = "best", file: str | None = None,
             stride: int = 0, tasks: list[str] | None = None, schema: str | None = None, max_items: int = 0,
             all_checkpoints: bool = False) -> list[dict]:
    from .report import print_table
    from .tokenizer import Tokenizer

    tok = Tokenizer.load(paths.tokenizer)
    d = stage_dir(paths, stage)
    whiches = sorted(p.name for p in (d / "ckpt").glob("step_*") if p.is_dir()) if all_checkpoints else [which]
    stage_name = next(s for s, attr in STAGE_DIRS.items() if getattr(paths, attr) == d)
    rows = []
    for w in whiches:
        model, meta, ckpt = load_run_model(paths, stage_name, w)
        label = f"{d.name}/{ckpt.name}"
        if file:
            device = pick_device(cfg.generate.device)
            rows += metric_rows(label, {Path(file).name: _eval_file(model.to(device), tok, file, stride, device)})
        elif not tasks:
            rows += metric_rows(label, evaluate_splits(model, tok, paths, cfg, progress=True))
        if tasks:
            rows += _task_rows(model, tok, tasks, schema, max_items, label)
    cols = METRIC_COLUMNS if not tasks else sorted({k for r in rows for k in r},
                                                   key=lambda k: (k not in ("model", "split", "task"), k))
    print_table(rows, cols, title=f"eval: {paths.root}")
    out = paths.root / "eval"
    out.mkdir(parents=True, exist_ok=True)
    paths.save_config(cfg, "eval", run_config=False)
    suffix = "_tasks" if tasks else ("_file" if file else "")
    (out / f"{d.name}_{which if not all_checkpoints else 'all'}{suffix}.json").write_text(
        json.dumps(rows, indent=2, default=float))
    return rows


def _eval_file(model, tok, file: str, stride: int, device) -> dict:
    from .data.sources import expand_inputs, iter_records
    from .evaluate import evaluate_text

    texts = [t for p in expand_inputs([file]) for t, _, _ in iter_records(p)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"{file} holds no text to evaluate")
    return evaluate_text(model, tok, texts, model.cfg.seq_len, stride=stride or None, device=device)


def _task_rows(model, tok, tasks, schema, max_items, label, loaded: dict | None = None,
               device="cpu") -> list[dict]:
    """One row per benchmark task: a registered name (its Hugging Face split through `datasets`, or a
    registered file) or a local file with --schema; both through tasks.load_task and tasks.score_items.

    `loaded`: {task: (name, spec, items)} loaded once for several checkpoints, or {task: reason} for a task
    that could not load (a row that says it was skipped, and why).
    """
    from .tasks import load_task, resolve_task, score_items

    rows = []
    for task in tasks:
        got = (loaded or {}).get(task)
        if isinstance(got, str):
            rows.append({"model": label, "task": task, "skipped": got})
            continue
        if got is None:
            name, spec = resolve_task(task, schema)
            items = load_task(name, max_items, spec)
        else:
            name, spec, items = got
        r = score_items(spec, items[:max_items] if max_items else items, model, tok, device=device)
        rows.append({"model": label, "task": name,
                     **{k: v for k, v in r.items() if k not in ("predictions", "samples")}, "source": spec.source()})
    return rows


# ---------------------------------------------------------------- generate, chat, serve

def generate(cfg: Config, paths: RunPaths, prompt: str, stage="auto", which="best", chat=False) -> str:
    eng = engine(cfg, paths, stage, which)
    g = cfg.generate
    kw = dict(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
              repetition_penalty=g.repetition_penalty, seed=g.seed)
    out = []
    stream = eng.chat_stream([{"role": "user", "content": prompt}], **kw) if chat else \
        eng.stream(eng.complete_prompt(prompt), **kw)
    if not chat:
        print(prompt, end="", flush=True)
    for piece in stream:
        print(piece, end="", flush=True)
        out.append(piece)
    print()
    return "".join(out)


def chat(cfg: Config, paths: RunPaths, stage="auto", which="best", system: str | None = None) -> None:
    from .chat_cli import run_chat
    g = cfg.generate
    run_chat(engine(cfg, paths, stage, which), system_prompt=system, max_new_tokens=g.max_new_tokens,
             temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, repetition_penalty=g.repetition_penalty)


def serve(cfg: Config, paths: RunPaths, stage="auto", which="best", api_key: str | None = None) -> None:
    from .serve.app import serve as serve_app
    s = cfg.serve
    if s.max_batch < 1:
        raise UserError(f"serve.max_batch (--max-batch) must be at least 1 (got {s.max_batch})")
    if s.max_body_mb <= 0:
        raise UserError(f"serve.max_body_mb (--max-body-mb) must be positive (got {s.max_body_mb})")
    serve_app(engine(cfg, paths, stage, which), host=s.host, port=s.port, api_key=api_key, model_name=cfg.name,
              max_batch=s.max_batch, max_body_mb=s.max_body_mb)


# ---------------------------------------------------------------- export, embeddings

def export(cfg: Config, paths: RunPaths, out: str | None, stage="auto", which="best", force=False, fmt="hf",
           gguf_type="f32") -> Path:
    if fmt not in ("hf", "gguf"):
        raise UserError(f"export format {fmt!r} is not known; use hf or gguf")
    out_root, paths = paths.root, chat_paths(paths, stage)
    model, meta, ckpt = load_run_model(paths, stage, which)
    if fmt == "gguf":
        from .gguf_export import check_tokenizer, export_gguf
        from .tokenizer import Tokenizer
        tok = Tokenizer.load(paths.tokenizer)
        check_tokenizer(tok)  # before the guard, so --force never deletes an export it cannot replace
        out_file = Path(out) if out else out_root / "export" / f"{cfg.name}-{gguf_type}.gguf"
        RunPaths.guard(out_file, force, "an export")
        export_gguf(model, tok, out_file, dtype=gguf_type, name=cfg.name, generation=cfg.generate)
        RunPaths(out_root).save_config(cfg, "export", run_config=False)
        print(f"export: {ckpt} -> {out_file} (run with llama.cpp: llama-cli -m {out_file} --jinja -cnv)")
        return out_file
    from .export import export_hf
    out_dir = Path(out) if out else out_root / "export" / "hf"
    RunPaths.guard(out_dir, force, "an export")
    export_hf(model, paths.tokenizer, out_dir, meta=meta, generation=cfg.generate)
    RunPaths(out_root).save_config(cfg, "export", run_config=False)
    print(f"export: {ckpt} -> {out_dir} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return out_dir


def embeddings(cfg: Config, paths: RunPaths, stage="auto", which="best", near=None, plot=None, k=10) -> None:
    from .embeddings import nearest, plot_projection, token_counts
    from .tokenizer import Tokenizer
    if not near and not plot:
        raise UserError("give --near WORD and/or --plot FILE.png")
    model, _, _ = load_run_model(paths, stage, which)
    tok = Tokenizer.load(paths.tokenizer)
    emb = model.embed_tokens.weight.detach()
    if near:
        for t, c in nearest(emb, tok, near, k=k):
            print(f"{c:+.3f}  {t!r}")
    if plot:
        counts = token_counts(paths.tokens / "train", tok.vocab_size) if (paths.tokens / "train").exists() else None
        plot_projection(emb, tok, Path(plot), counts=counts)
        print(f"embeddings: projection written to {plot}")


# ---------------------------------------------------------------- eval --suite: a report card

def evaluate_suite(cfg: Config, paths: RunPaths, suite: str = "core", stage: str = "auto", which: str = "best",
                   max_items: int | None = None, all_checkpoints: bool = False, tasks: list[str] | None = None,
                   schema: str | None = None) -> list[dict]:
    """`chatforge eval RUN --suite core`: each task of the suite (and any --task) on its first max_items items
    (default tasks.SUITE_ITEMS; 0 = all): score, random baseline, centred score, and their mean ("core").
    A task that cannot load (no network and no cache) is a skipped row with its reason; none loading is an
    error. Rows go to RUN/eval/<stage>_<checkpoint>_suite_<suite>.json, which `chatforge report` shows."""
    from .report import print_table
    from .tasks import SUITE_ITEMS, SUITES, core_summary, load_task, resolve_task
    from .tokenizer import Tokenizer

    if suite not in SUITES:
        raise UserError(f"unknown suite '{suite}'; known: {', '.join(SUITES)}")
    n_items = SUITE_ITEMS if max_items is None else max_items
    names = list(dict.fromkeys(list(SUITES[suite]) + list(tasks or [])))
    tok = Tokenizer.load(paths.tokenizer)
    d = stage_dir(paths, stage)
    loaded: dict = {}
    for task in names:  # once, for every checkpoint
        try:
            name, spec = resolve_task(task, schema)
            loaded[task] = (name, spec, load_task(name, n_items, spec))
        except UserError as e:
            loaded[task] = str(e)
    skipped = [t for t, v in loaded.items() if isinstance(v, str)]
    if len(skipped) == len(names):
        raise UserError(f"suite '{suite}': none of its {len(names)} tasks could be loaded; {loaded[names[0]]}"
                        + (f" (and likewise for {', '.join(names[1:])})" if len(names) > 1 else ""))
    for t in skipped:
        print(f"eval: skipping {t}: {loaded[t]}", file=sys.stderr)
    whiches = sorted(p.name for p in (d / "ckpt").glob("step_*") if p.is_dir()) if all_checkpoints else [which]
    stage_name = next(s for s, attr in STAGE_DIRS.items() if getattr(paths, attr) == d)
    device = pick_device(cfg.generate.device)
    rows, cores = [], []
    for w in whiches:
        model, _, ckpt = load_run_model(paths, stage_name, w, device=device)
        label = f"{d.name}/{ckpt.name}"
        part = _task_rows(model, tok, names, schema, n_items, label, loaded=loaded, device=device)
        core = core_summary(part)
        rows += part + ([{"model": label, **core}] if core else [])
        if core:
            cores.append(f"{label} core {core['score']:.4f} (mean centred score of {core['tasks']} of {len(names)} tasks)")
    shown = [{**r, "skipped": "yes (why: above)"} if "skipped" in r else r for r in rows]  # reasons are long
    print_table(shown, ["model", "task", "metric", "score", "random_baseline", "centered", "n", "skipped"],
                title=f"eval --suite {suite}: {paths.root} (first {n_items or 'all'} items per task)")
    for line in cores:
        print(line)
    out = paths.root / "eval"
    out.mkdir(parents=True, exist_ok=True)
    paths.save_config(cfg, "eval", run_config=False)
    (out / f"{d.name}_{which if not all_checkpoints else 'all'}_suite_{suite}.json").write_text(
        json.dumps(rows, indent=2, default=float))
    return rows
