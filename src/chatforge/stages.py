"""The stages as functions of (config, run directory): the CLI's glue, and the demo that chains them.

Each stage reads only what earlier stages left in the run directory, so any stage can be re-run alone.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from argparse import Namespace
from dataclasses import asdict
from pathlib import Path

from .config import Config, load_config, save_config
from .errors import UserError
from .paths import RunPaths


# ---------------------------------------------------------------- setup

def _split_positionals(args: Namespace) -> tuple[list[str], list[str]]:
    overrides, positionals = [], []
    for item in getattr(args, "overrides", None) or []:
        (overrides if "=" in item and not Path(item).exists() else positionals).append(item)
    return overrides, positionals


def resolve(args: Namespace) -> tuple[Config, RunPaths, list[str]]:
    """Config and run dir from --config / --run-dir / a positional RUN_DIR / the run's saved config.yaml."""
    overrides, positionals = _split_positionals(args)
    run_dir = args.run_dir or (positionals.pop(0) if positionals else None)
    source = args.config
    if source is None and run_dir and (Path(run_dir) / "config.yaml").is_file():
        source = str(Path(run_dir) / "config.yaml")
    cfg = load_config(source or "demo", overrides)
    paths = RunPaths(Path(run_dir) if run_dir else Path("runs") / cfg.name)
    return cfg, paths, positionals


def _guard(path: Path, force: bool, what: str) -> None:
    """Refuse to overwrite a user's outputs unless --force."""
    if path.exists() and any(path.iterdir() if path.is_dir() else [path]):
        if not force:
            raise UserError(f"{what} already exists at {path}; pass --force to overwrite it (or choose another --run-dir)")
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _need(path: Path, stage: str) -> None:
    if not path.exists():
        raise UserError(f"{path} not found: run `chatforge {stage}` for this run directory first")


def _save_cfg(cfg: Config, paths: RunPaths) -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, paths.config)


def _console():
    from rich.console import Console
    return Console()


# ---------------------------------------------------------------- stages

def prepare(cfg: Config, paths: RunPaths, force: bool = False, shard: int | None = None, num_shards: int = 1) -> dict:
    from .data.prepare import prepare_corpus, prepare_sft

    if shard is not None and not 0 <= shard < num_shards:
        raise UserError(f"--shard {shard} must be between 0 and --num-shards - 1 ({num_shards - 1})")
    _guard(paths.data, force, "prepared data")
    _save_cfg(cfg, paths)
    t0 = time.time()
    if shard is not None:
        manifest = prepare_corpus(cfg.data, paths.data, shard_index=shard, num_shards=num_shards)
        print(f"prepare: part {shard} of {num_shards}: {manifest.get('documents_written', '?')} documents written to "
              f"{paths.data}; join the parts with `chatforge merge --parts DIR... --run-dir RUN`")
        return {"corpus": manifest}
    manifest = prepare_corpus(cfg.data, paths.data)
    sft = prepare_sft(cfg.sft, paths.data)
    _print_prepare(manifest, sft, time.time() - t0)
    return {"corpus": manifest, "sft": sft}


def merge(cfg: Config, paths: RunPaths, parts: list[str], force: bool = False) -> dict:
    from .data.merge import merge_parts
    from .data.prepare import prepare_sft

    _guard(paths.data, force, "prepared data")
    _save_cfg(cfg, paths)
    t0 = time.time()
    manifest = merge_parts([Path(p) for p in parts], paths.data, cfg.data)
    sft = prepare_sft(cfg.sft, paths.data)
    _print_prepare(manifest, sft, time.time() - t0)
    return {"corpus": manifest, "sft": sft}


def _print_prepare(manifest: dict, sft: dict, seconds: float) -> None:
    from rich.table import Table

    t = Table(title=f"prepare ({seconds:.1f} s)")
    for col in ("what", "documents", "bytes"):
        t.add_column(col, justify="right" if col != "what" else "left")
    for split in ("train", "val"):
        s = manifest.get("splits", {}).get(split, {})
        t.add_row(f"kept: {split}", str(s.get("documents", s.get("docs", ""))), str(s.get("bytes", "")))
    for reason, d in (manifest.get("dropped") or {}).items():
        t.add_row(f"dropped: {reason}", str(d.get("documents", "")), str(d.get("bytes", "")))
    for reason, n in (manifest.get("read_errors") or {}).items():
        t.add_row(f"read problem: {reason}", str(n), "")
    for split in ("train", "val"):
        t.add_row(f"chat examples: {split}", str(sft.get("counts", {}).get(split, "")), "")
    for reason, n in (sft.get("skipped") or {}).items():
        t.add_row(f"chat skipped: {reason}", str(n), "")
    _console().print(t)


def tokenizer(cfg: Config, paths: RunPaths, force: bool = False):
    from .data.prepare import iter_documents
    from .tokenizer import Tokenizer

    _need(paths.data / "manifest.json", "prepare")
    _guard(paths.tokenizer, force, "a tokenizer")
    _save_cfg(cfg, paths)
    t0 = time.time()
    tok = Tokenizer.train(iter_documents(paths.data, "train"), cfg.tokenizer)
    tok.save(paths.tokenizer)
    from .tokenizer import compression_report, reference_bytes_per_token
    val = list(iter_documents(paths.data, "val"))
    ours = compression_report(tok, val, max_bytes=5_000_000)["bytes_per_token"] if val else float("nan")
    ref = float("nan")
    if tok.kind == "bpe" and val:
        ref = reference_bytes_per_token(iter_documents(paths.data, "train"), val, tok.vocab_size)
    print(f"tokenizer: {tok.kind}, vocabulary {tok.vocab_size}, trained in {time.time() - t0:.1f} s -> {paths.tokenizer}\n"
          f"  val split: {ours:.3f} bytes/token (reference HF ByteLevelBPETokenizer, same data and size: {ref:.3f}); "
          f"fast encoder: {tok.fast_backend}{' (' + tok.fast_note + ')' if getattr(tok, 'fast_note', '') else ''}")
    (paths.tokenizer / "stats.json").write_text(json.dumps(
        {"kind": tok.kind, "vocab_size": tok.vocab_size, "val_bytes_per_token": ours,
         "reference_val_bytes_per_token": ref, "hash": tok.hash, "fast_backend": tok.fast_backend}, indent=2))
    return tok


def encode(cfg: Config, paths: RunPaths, force: bool = False) -> dict:
    from .data.prepare import iter_documents
    from .data.shards import write_shards
    from .tokenizer import Tokenizer

    _need(paths.data / "manifest.json", "prepare")
    tok = Tokenizer.load(paths.tokenizer)
    _guard(paths.tokens, force, "token shards")
    _save_cfg(cfg, paths)
    stats = {}
    for split in ("train", "val"):
        stats[split] = write_shards(tok, iter_documents(paths.data, split), paths.tokens / split,
                                    workers=cfg.data.workers)
        print(f"encode {split}: {stats[split]['tokens']:,} tokens in {stats[split]['docs']:,} documents")
    (paths.tokens / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def _model_config(cfg: Config, tok) -> None:
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                        f"{tok.vocab_size}; set model.vocab_size=0 to take it from the tokenizer")


def _val_arrays(paths: RunPaths, tok):
    from .data.shards import open_shards
    return [s.tokens for s in open_shards(paths.tokens / "val", tok_hash=tok.hash, vocab_size=tok.vocab_size)]


def pretrain(cfg: Config, paths: RunPaths, force: bool = False, resume: bool = False) -> dict:
    import torch

    from .data.loader import TokenLoader, iter_eval_batches
    from .distributed import setup, teardown
    from .model import GPT
    from .tokenizer import Tokenizer
    from .train import train

    tok = Tokenizer.load(paths.tokenizer)
    _need(paths.tokens / "train", "encode")
    _model_config(cfg, tok)
    if not resume:
        _guard(paths.pretrain, force, "a pretraining run")
    dist = setup(cfg.train.device)
    if dist.is_main:
        _save_cfg(cfg, paths)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    if dist.is_main:
        print(f"model: {model.num_params():,} parameters, {model.flops_per_token() / 1e6:.1f} MFLOPs per token "
              f"(training), context {cfg.model.seq_len}")
    loader = TokenLoader.from_dir(paths.tokens / "train", cfg.train.batch_size, cfg.model.seq_len,
                                  rank=dist.rank, world=dist.world, seed=cfg.train.seed,
                                  tok_hash=tok.hash, vocab_size=tok.vocab_size)
    val = _val_arrays(paths, tok)

    def val_batches():
        return iter_eval_batches(val, cfg.eval.batch_size, cfg.model.seq_len, max_batches=cfg.train.eval_batches)

    meta = {"stage": "pretrain", "model": asdict(cfg.model), "tokenizer_hash": tok.hash}
    summary = train(model, cfg.train, loader, paths.pretrain, val_batches=val_batches, meta=meta,
                    resume=resume, dist=dist, on_eval=sampler(tok, cfg, chat=False))
    if dist.is_main:
        _plot(paths.pretrain)
    teardown()
    return summary


SAMPLE_PROMPTS = ["def ", "import ", "class "]
SAMPLE_QUESTIONS = ["What does os.path.join do?", "What is the json module for?"]


def sampler(tok, cfg: Config, chat: bool):
    """Fixed-prompt samples at each evaluation (seeded), stored in metrics.jsonl beside the losses."""
    def on_eval(model, step):
        from .engine import Engine
        eng = Engine(model, tok, device=str(next(model.parameters()).device))
        if chat:
            prompts = SAMPLE_QUESTIONS
            ids = [tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0] for q in prompts]
        else:
            prompts = SAMPLE_PROMPTS
            ids = [tok.with_bos(tok.encode(p)) for p in prompts]
        outs = eng.generate(ids, max_new_tokens=min(48, cfg.generate.max_new_tokens),
                            temperature=cfg.generate.temperature, top_k=cfg.generate.top_k,
                            seed=cfg.generate.seed, stop_ids=tok.stop_ids)
        return [{"prompt": p, "text": (p if not chat else "") + tok.decode(o)} for p, o in zip(prompts, outs)]
    return on_eval


def _plot(stage_dir: Path) -> None:
    from .report import plot_loss_curves
    plot_loss_curves({stage_dir.name: stage_dir / "metrics.jsonl"}, stage_dir / "loss.png",
                     title=f"{stage_dir.name} loss")


def _sft_examples(tok, path: Path, seq_len: int):
    from .finetune import sft_examples
    return sft_examples(tok, path, seq_len)


def finetune(cfg: Config, paths: RunPaths, force: bool = False, resume: bool = False,
             inputs: list[str] | None = None, init: str | None = None, **options) -> dict:
    """options: mode, lora_rank, lora_alpha, lora_dropout, lora_targets, eval_prompts (None -> cfg.finetune)."""
    from .finetune import run_finetune
    for key, value in options.items():
        if value is not None:
            setattr(cfg.finetune, key, [t for t in value.split(",") if t] if key == "lora_targets" else value)
    return run_finetune(cfg, paths, force=force, resume=resume, inputs=inputs, init=init)


STAGE_DIRS = {"finetune": "finetune", "pretrain": "pretrain", "import": "imported"}


def _stage_dir(paths: RunPaths, stage: str) -> Path:
    if stage == "auto":  # the latest model of the run: fine-tuned, else pretrained, else imported
        stage = next((s for s in STAGE_DIRS if (getattr(paths, STAGE_DIRS[s]) / "ckpt").exists()), "pretrain")
    d = getattr(paths, STAGE_DIRS[stage])
    _need(d / "ckpt", stage)
    return d


def import_model(cfg: Config, paths: RunPaths, source: str, context: int = 0, force: bool = False) -> dict:
    """A pre-trained model (GGUF file, HF folder, or a known name) -> the run's tokenizer and import/ checkpoint."""
    from .checkpoint import save_checkpoint
    from .hub import load_source

    if context < 0:
        raise UserError(f"--context {context} must be positive")
    for what, path in (("a tokenizer", paths.tokenizer), ("an imported model", paths.imported)):
        if path.exists() and any(path.iterdir()) and not force:
            raise UserError(f"{what} already exists at {path}; pass --force to overwrite it (or choose another --run-dir)")
    t0 = time.time()
    model, tok, info = load_source(source, context or None)  # reads and checks everything before writing
    _guard(paths.tokenizer, force, "a tokenizer")
    _guard(paths.imported, force, "an imported model")
    cfg.model = model.cfg
    _save_cfg(cfg, paths)
    tok.save(paths.tokenizer)
    meta = {"stage": "import", "model": asdict(model.cfg), "tokenizer_hash": tok.hash, "source": info}
    save_checkpoint(paths.imported / "ckpt", 0, model, None, None, None, meta, keep_last=1)
    (paths.imported / "source.json").write_text(json.dumps(info, indent=2, default=str))
    c = model.cfg
    print(f"import: {info.get('name') or source} ({info['format']}) -> {paths.root} in {time.time() - t0:.1f} s\n"
          f"  {model.num_params():,} parameters, {c.n_layer} layers, width {c.n_embd}, {c.n_head}/{c.n_kv_head} heads, "
          f"vocabulary {c.vocab_size}, context {c.seq_len} (the model's own: {info.get('native_context')})\n"
          f"  chat: {'its own template' if tok.chat_template else 'no template'}, replies end at "
          f"{tok.id_to_token(tok.end_id)!r}; next: chatforge chat {paths.root}")
    return info


def _load(paths: RunPaths, stage: str, which: str):
    from .checkpoint import load_model, resolve_checkpoint
    d = _stage_dir(paths, stage)
    ckpt = resolve_checkpoint(d / "ckpt", which)
    model, meta = load_model(ckpt)
    return model, meta, ckpt


def evaluate_splits(model, tok, paths: RunPaths, cfg: Config) -> dict:
    """Metrics on both validation sets: pretraining text and the chat fine-tuning set."""
    import numpy as np

    from .data.loader import iter_eval_batches, iter_sft_eval_batches
    from .evaluate import evaluate_lm

    seq_len = model.cfg.seq_len
    token_bytes = np.asarray(tok.token_bytes_lengths())
    out = {}
    sft_val = paths.data / "sft_val.jsonl"
    if not (paths.tokens / "val").is_dir() and not sft_val.exists():
        raise UserError(f"{paths.root} has no validation split (an imported model?): evaluate with --file TEXT or "
                        f"--task NAME, or build one with `chatforge prepare` and `chatforge encode`")
    if (paths.tokens / "val").is_dir() or not sft_val.exists():
        val = _val_arrays(paths, tok)
        out["text val"] = evaluate_lm(model, iter_eval_batches(val, cfg.eval.batch_size, seq_len,
                                                               max_batches=cfg.eval.max_batches),
                                      token_bytes=token_bytes)
    if sft_val.exists():
        ex, _ = _sft_examples(tok, sft_val, seq_len)
        out["chat val"] = evaluate_lm(model, iter_sft_eval_batches(ex, cfg.eval.batch_size, seq_len, pad_id=tok.pad_id),
                                      token_bytes=token_bytes)
    return out


METRIC_COLUMNS = ["model", "split", "loss", "ppl", "acc", "top5", "bpb", "tokens"]


def _rows(label: str, results: dict) -> list[dict]:
    return [{"model": label, "split": split, **m} for split, m in results.items()]


def evaluate(cfg: Config, paths: RunPaths, stage: str = "auto", which: str = "best", file: str | None = None,
             stride: int = 0, tasks: list[str] | None = None, schema: str | None = None, max_items: int = 0,
             all_checkpoints: bool = False) -> list[dict]:
    from .report import print_table
    from .tokenizer import Tokenizer

    tok = Tokenizer.load(paths.tokenizer)
    d = _stage_dir(paths, stage)
    if all_checkpoints:
        whiches = sorted(p.name for p in (d / "ckpt").glob("step_*") if p.is_dir())
    else:
        whiches = [which]
    rows = []
    for w in whiches:
        model, meta, ckpt = _load(paths, d.name, w)
        label = f"{d.name}/{ckpt.name}"
        if file:
            rows += _rows(label, {Path(file).name: _eval_file(model, tok, file, stride)})
        elif not tasks:
            rows += _rows(label, evaluate_splits(model, tok, paths, cfg))
        if tasks:
            rows += _benchmarks(model, tok, tasks, schema, max_items, label)
    cols = METRIC_COLUMNS if not tasks else sorted({k for r in rows for k in r}, key=lambda k: (k not in ("model", "split", "task"), k))
    print_table(rows, cols, title=f"eval: {paths.root}")
    out = paths.root / "eval"
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_tasks" if tasks else ("_file" if file else "")
    (out / f"{d.name}_{which if not all_checkpoints else 'all'}{suffix}.json").write_text(json.dumps(rows, indent=2, default=float))
    return rows


def _eval_file(model, tok, file: str, stride: int) -> dict:
    from .data.sources import expand_inputs, iter_records
    from .evaluate import evaluate_text

    texts = [t for p in expand_inputs([file]) for t, _, _ in iter_records(p)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"{file} holds no text to evaluate")
    return evaluate_text(model, tok, texts, model.cfg.seq_len, stride=stride or None)


def _benchmarks(model, tok, tasks, schema, max_items, label) -> list[dict]:
    from .benchmarks import TASKS, load_items, score_gsm8k, score_multiple_choice
    from .engine import Engine

    rows = []
    for task in tasks:
        if task in TASKS:
            spec = TASKS[task]
            path, sch = spec.path, spec.schema
        else:
            if not Path(task).exists():
                raise UserError(f"unknown task '{task}': give a registered name ({', '.join(TASKS)}) or a JSONL file")
            if not schema:
                raise UserError(f"--schema is needed for the file {task}: hellaswag | arc | gsm8k")
            path, sch = task, schema
        items = load_items(path, sch)
        if sch == "gsm8k":
            r = score_gsm8k(Engine(model, tok), tok, items, max_new_tokens=256, max_items=max_items)
        else:
            r = score_multiple_choice(model, tok, items, max_items=max_items)
        rows.append({"model": label, "task": Path(str(task)).name,
                     **{k: v for k, v in r.items() if k not in ("predictions", "samples")}})
    return rows


def generate(cfg: Config, paths: RunPaths, prompt: str, stage="auto", which="best", chat=False) -> str:

    engine = _engine(chat_paths(paths, stage), stage, which, cfg.generate.weights)
    g = cfg.generate
    kw = dict(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
              repetition_penalty=g.repetition_penalty, seed=g.seed)
    out = []
    stream = engine.chat_stream([{"role": "user", "content": prompt}], **kw) if chat else \
        engine.stream(engine.complete_prompt(prompt), **kw)
    if not chat:
        print(prompt, end="", flush=True)
    for piece in stream:
        print(piece, end="", flush=True)
        out.append(piece)
    print()
    return "".join(out)


CHAT_MODEL = "chat_model.json"  # in a demo run: which of its models chat/serve/export/generate use


def chat_paths(paths: RunPaths, stage: str) -> RunPaths:
    """The run whose model is used: with --stage auto, a demo run's pick (RUN/chat_model.json), else the run."""
    pick = paths.root / CHAT_MODEL
    if stage == "auto" and pick.is_file():
        sub = json.loads(pick.read_text()).get("run")
        if sub:
            return RunPaths(paths.root / sub)
    return paths


def _engine(paths: RunPaths, stage: str, which: str, weights: str = "fp32"):
    from .engine import Engine
    from .tokenizer import Tokenizer
    model, meta, ckpt = _load(paths, stage, which)
    return Engine(model, Tokenizer.load(paths.tokenizer), device="auto", weights=weights)


def chat(cfg: Config, paths: RunPaths, stage="auto", which="best", system: str | None = None) -> None:
    from .chat_cli import run_chat
    g = cfg.generate
    run_chat(_engine(chat_paths(paths, stage), stage, which, g.weights), system_prompt=system, max_new_tokens=g.max_new_tokens,
             temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, repetition_penalty=g.repetition_penalty)


def serve_run(cfg: Config, paths: RunPaths, stage="auto", which="best", host="127.0.0.1", port=8000, api_key=None,
              max_batch=8, max_body_mb=1.0):
    from .serve.app import serve
    if max_batch < 1:
        raise UserError(f"--max-batch must be at least 1 (got {max_batch})")
    if max_body_mb <= 0:
        raise UserError(f"--max-body-mb must be positive (got {max_body_mb})")
    serve(_engine(chat_paths(paths, stage), stage, which, cfg.generate.weights), host=host, port=port,
          api_key=api_key, model_name=cfg.name, max_batch=max_batch, max_body_mb=max_body_mb)


def export(cfg: Config, paths: RunPaths, out: str | None, stage="auto", which="best", force=False, fmt="hf",
           gguf_type="f32") -> Path:
    if fmt not in ("hf", "gguf"):
        raise UserError(f"export format {fmt!r} is not known; use hf or gguf")
    out_root, paths = paths.root, chat_paths(paths, stage)
    model, meta, ckpt = _load(paths, stage, which)
    if fmt == "gguf":
        from .gguf_export import check_tokenizer, export_gguf
        from .tokenizer import Tokenizer
        tok = Tokenizer.load(paths.tokenizer)
        check_tokenizer(tok)  # before the guard, so --force never deletes an export it cannot replace
        out_file = Path(out) if out else out_root / "export" / f"{cfg.name}-{gguf_type}.gguf"
        _guard(out_file, force, "an export")
        export_gguf(model, tok, out_file, dtype=gguf_type, name=cfg.name)
        print(f"export: {ckpt} -> {out_file} (run with llama.cpp: llama-cli -m {out_file} --jinja -cnv)")
        return out_file
    from .export import export_hf
    out_dir = Path(out) if out else out_root / "export" / "hf"
    _guard(out_dir, force, "an export")
    export_hf(model, paths.tokenizer, out_dir, meta=meta)
    print(f"export: {ckpt} -> {out_dir} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return out_dir


def embeddings(cfg: Config, paths: RunPaths, stage="auto", which="best", near=None, plot=None, k=10) -> None:
    from .embeddings import nearest, plot_projection
    from .tokenizer import Tokenizer
    model, _, _ = _load(paths, stage, which)
    tok = Tokenizer.load(paths.tokenizer)
    emb = model.embed_tokens.weight.detach()
    if not near and not plot:
        raise UserError("give --near WORD and/or --plot FILE.png")
    if near:
        for t, c in nearest(emb, tok, near, k=k):
            print(f"{c:+.3f}  {t!r}")
    if plot:
        from .embeddings import token_counts
        counts = token_counts(paths.tokens / "train", tok.vocab_size) if (paths.tokens / "train").exists() else None
        plot_projection(emb, tok, Path(plot), counts=counts)
        print(f"embeddings: projection written to {plot}")


# ---------------------------------------------------------------- demo and report

def held_out_questions(paths: RunPaths, n: int = 5) -> list[str]:
    from .evidence import held_out
    return [it["messages"][-1]["content"] for it in held_out(paths.data / "sft_val.jsonl", n)]


def answer(engine, questions: list[str], max_new_tokens: int) -> list[dict]:
    out = []
    for q in questions:
        ids = engine.tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
        gen = engine.generate(ids, max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=engine.tok.stop_ids)[0]
        ended = bool(gen) and gen[-1] == engine.tok.end_id  # the rule of evidence.reply_check
        out.append({"question": q, "answer": engine.tok.decode(gen), "ended_at_end_of_turn": ended})
    return out


def report(cfg: Config, paths: RunPaths, evals: list[dict] | None = None, answers: list[dict] | None = None,
           comparison: dict | None = None) -> Path:
    from .report import plot_loss_curves, write_report

    curves = {s: getattr(paths, s) / "metrics.jsonl" for s in ("pretrain", "finetune")
              if (getattr(paths, s) / "metrics.jsonl").exists()}
    if curves:
        plot_loss_curves(curves, paths.root / "loss.png", title=f"{cfg.name}: loss")
    if evals is None:
        p = paths.root / "eval" / "demo.json"
        evals = json.loads(p.read_text()) if p.exists() else []
    if answers is None:
        p = paths.root / "eval" / "answers.json"
        answers = json.loads(p.read_text()) if p.exists() else []
    notes = []
    fe = paths.finetune / "finetune_eval.json"
    if fe.exists():
        e = json.loads(fe.read_text())
        b, a = e.get("before", {}), e.get("after", {})
        notes.append(f"fine-tuning ({e.get('mode')}{', LoRA' if e.get('lora') else ''}): replies to "
                     f"{a.get('prompts')} held-out prompts that end with end-of-turn within {e.get('max_new_tokens')} "
                     f"tokens: {b.get('end_of_turn_share', 0):.0%} before, {a.get('end_of_turn_share', 0):.0%} after "
                     f"(sampled with the generate settings; greedy: {b.get('end_of_turn_share_greedy') or 0:.0%} before, "
                     f"{a.get('end_of_turn_share_greedy') or 0:.0%} after)")
    samples = []
    for stage, mpath in curves.items():  # the fixed-prompt samples of each stage's last evaluation
        recs = [json.loads(l) for l in mpath.read_text().splitlines() if '"sample"' in l]
        last = max((r["step"] for r in recs), default=None)
        samples += [{**r, "prompt": f"{stage} step {r['step']}: {r['prompt']}"} for r in recs if r["step"] == last]
    tok_stats = paths.tokenizer / "stats.json"
    benchmarks = []  # every benchmark row any `chatforge eval --task` wrote for this run
    for f in sorted((paths.root / "eval").glob("*.json")) if (paths.root / "eval").exists() else []:
        rows = json.loads(f.read_text())
        benchmarks += [{k: v for k, v in r.items() if k not in ("predictions", "samples")}
                       for r in rows if isinstance(r, dict) and "task" in r]
    if comparison is None and (paths.root / "eval" / "comparison.json").is_file():
        comparison = json.loads((paths.root / "eval" / "comparison.json").read_text())
    sections = {"comparison": comparison, "config": cfg.to_dict(), "evals": evals, "benchmarks": benchmarks, "answers": answers or [], "notes": notes,
                "plots": ["loss.png"] if curves else [], "samples": [{k: v for k, v in x.items() if k != "step"}
                                                                   for x in samples],
                "tokenizer": json.loads(tok_stats.read_text()) if tok_stats.exists() else None}
    return write_report(paths.root, sections)


def demo(cfg: Config, paths: RunPaths, force: bool = False) -> Path:
    """Every stage from scratch on the run's data, then (cfg.demo.pretrained) the same chat fine-tuning of a real
    pre-trained model in RUN/pretrained; chat/serve/export of RUN use whichever answers held-out questions better."""
    from .engine import Engine
    from .report import print_table
    from .tokenizer import Tokenizer

    from .hub import KNOWN
    src = cfg.demo.pretrained
    if src and src not in KNOWN and not Path(src).exists():  # before minutes of from-scratch training
        raise UserError(f"demo.pretrained={src!r}: no such file or folder; give a .gguf file, a Hugging Face "
                        f"folder, one of {', '.join(KNOWN)}, or \"\" for the from-scratch model alone")
    if paths.root.exists() and any(paths.root.iterdir()):
        if not force:
            raise UserError(f"run directory {paths.root} already exists; pass --force to overwrite it "
                            f"(or choose another --run-dir)")
        shutil.rmtree(paths.root)
    t0 = time.time()
    n = 9 if cfg.demo.pretrained else 7
    times: dict[str, float] = {}
    steps = [("prepare", lambda: prepare(cfg, paths)), ("tokenizer", lambda: tokenizer(cfg, paths)),
             ("encode", lambda: encode(cfg, paths)), ("pretrain", lambda: pretrain(cfg, paths))]
    for i, (name, fn) in enumerate(steps, 1):
        print(f"\n== [{i}/{n}] {name}")
        t = time.time()
        result = fn()
        times[name] = time.time() - t
        if isinstance(result, dict) and result.get("interrupted"):
            raise UserError(f"{name} was interrupted (its checkpoint is saved); continue with "
                            f"`chatforge {name} {paths.root} --resume`, then the later stages")
    tok = Tokenizer.load(paths.tokenizer)
    print(f"\n== [5/{n}] eval (base model)")
    t = time.time()
    base, _, _ = _load(paths, "pretrain", "best")
    rows = _rows("base", evaluate_splits(base, tok, paths, cfg))
    times["eval"] = time.time() - t
    print(f"\n== [6/{n}] finetune")
    t = time.time()
    if finetune(cfg, paths).get("interrupted"):
        raise UserError(f"finetune was interrupted (its checkpoint is saved); continue with "
                        f"`chatforge finetune {paths.root} --resume`")
    times["finetune"] = time.time() - t
    print(f"\n== [7/{n}] eval (fine-tuned) and chat")
    t = time.time()
    tuned, _, _ = _load(paths, "finetune", "best")
    rows += _rows("fine-tuned", evaluate_splits(tuned, tok, paths, cfg))
    print_table(rows, METRIC_COLUMNS, title="validation")
    (paths.root / "eval").mkdir(exist_ok=True)
    (paths.root / "eval" / "demo.json").write_text(json.dumps(rows, indent=2, default=float))
    answers = answer(Engine(tuned, tok), held_out_questions(paths), cfg.generate.max_new_tokens)
    (paths.root / "eval" / "answers.json").write_text(json.dumps(answers, indent=2))
    for a in answers:
        print(f"\nQ: {a['question']}\nA: {a['answer']}")
    times["eval fine-tuned"] = time.time() - t
    comparison = None
    if cfg.demo.pretrained:
        print(f"\n== [8/{n}] a pre-trained model ({cfg.demo.pretrained}): import, fine-tune on the same chats")
        t = time.time()
        pre = _demo_pretrained(cfg, paths)
        times["pretrained: import + finetune"] = time.time() - t
        print(f"\n== [9/{n}] compare on the same held-out questions")
        if pre is not None:
            label = Path(cfg.demo.pretrained).stem if cfg.demo.pretrained.endswith(".gguf") else \
                Path(cfg.demo.pretrained).name
            comparison = compare_chat_models(paths, {"from scratch": paths, label: pre})
    rep = report(cfg, paths, rows, answers, comparison=comparison)
    (paths.root / "eval" / "demo_times.json").write_text(json.dumps(times, indent=2))
    split = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    print(f"\ndemo finished in {time.time() - t0:.0f} s ({split}). Report: {rep}\n"
          f"chat with it:  chatforge chat {paths.root}")
    return rep


def _demo_pretrained(cfg: Config, paths: RunPaths) -> RunPaths | None:
    """Import cfg.demo.pretrained into RUN/pretrained and fine-tune it on RUN's chat set with cfg.demo.finetune;
    None when a named model cannot be downloaded (one line says so; the demo goes on without it)."""
    import copy

    from .data.prepare import iter_documents
    from .data.shards import write_shards
    from .hub import KNOWN
    from .tokenizer import Tokenizer

    sub = RunPaths(paths.root / "pretrained")
    scfg = copy.deepcopy(cfg)
    scfg.name, scfg.finetune = f"{cfg.name}-pretrained", copy.deepcopy(cfg.demo.finetune)
    scfg.eval.max_batches = cfg.demo.eval_batches
    try:
        import_model(scfg, sub, cfg.demo.pretrained)
    except UserError as e:
        if cfg.demo.pretrained in KNOWN and "could not download" in str(e):
            print(f"demo: {cfg.demo.pretrained} could not be downloaded (no network?); the demo goes on with the "
                  f"from-scratch model alone")
            shutil.rmtree(sub.root, ignore_errors=True)
            return None
        raise
    sub.data.mkdir(parents=True, exist_ok=True)
    for f in ("sft_train.jsonl", "sft_val.jsonl", "sft_manifest.json"):  # the same chats, the same split
        if (paths.data / f).is_file():
            shutil.copyfile(paths.data / f, sub.data / f)
    # Forgetting: the run's validation text in this model's tokens (its general-text loss before and after).
    write_shards(Tokenizer.load(sub.tokenizer), iter_documents(paths.data, "val"), sub.tokens / "val")
    if finetune(scfg, sub).get("interrupted"):
        raise UserError(f"finetune was interrupted (its checkpoint is saved); continue with "
                        f"`chatforge finetune {sub.root} --resume`")
    return sub


def compare_chat_models(paths: RunPaths, runs: dict[str, RunPaths]) -> dict:
    """Held-out answers of each run's fine-tuned model (from its finetune_eval.json), side by side; the one
    with the higher ROUGE-L becomes the run's chat model (RUN/chat_model.json)."""
    evs = {label: json.loads((p.finetune / "finetune_eval.json").read_text()) for label, p in runs.items()}
    rows = []
    for label, ev in evs.items():
        a, b = ev["after"], ev["before"]
        rows.append({"model": label, "ROUGE-L before": b.get("rouge_l"), "ROUGE-L after": a.get("rouge_l"),
                     "end-of-turn before": b.get("end_of_turn_share_greedy"),
                     "end-of-turn after": a.get("end_of_turn_share_greedy"),
                     "general loss before": b.get("general_val_loss"), "general loss after": a.get("general_val_loss"),
                     "questions": a.get("prompts")})
    best = max(rows, key=lambda r: r["ROUGE-L after"] or 0.0)["model"]
    sub = runs[best].root.relative_to(paths.root).as_posix() if runs[best].root != paths.root else ""
    (paths.root / CHAT_MODEL).write_text(json.dumps({"run": sub, "model": best, "by": "ROUGE-L F1 of greedy replies "
                                                     "to the held-out questions", "scores": rows}, indent=2))
    answers: dict[str, dict] = {}
    for label, ev in evs.items():
        for r in ev["after"].get("replies", []):
            q = answers.setdefault(r["prompt"], {"question": r["prompt"], "reference": r.get("reference")})
            q[label] = r["reply_greedy"]
    from .report import print_table
    print_table(rows, list(rows[0]), title="fine-tuned models on the same held-out questions")
    print(f"chat/serve/export of {paths.root} use: {best}")
    out = {"rows": rows, "best": best, "answers": list(answers.values()), "models": list(runs)}
    (paths.root / "eval").mkdir(exist_ok=True)
    (paths.root / "eval" / "comparison.json").write_text(json.dumps(out, indent=2, default=float))
    return out


# ---------------------------------------------------------------- dispatch

def _exit_status(summary: dict | None, stage: str, paths: RunPaths) -> int:
    """0, or after a SIGINT/SIGTERM (checkpoint saved) 128 + the signal, as shells expect, so that
    `chatforge pretrain R && chatforge finetune R` does not go on with a half-trained model."""
    if not summary or not summary.get("interrupted"):
        return 0
    sig = int(summary.get("signal") or 2)
    print(f"chatforge {stage}: stopped by signal {sig} after saving a checkpoint; continue with "
          f"`chatforge {stage} {paths.root} --resume`", file=sys.stderr)
    return 128 + sig


def run(args: Namespace) -> int:
    cfg, paths, extra = resolve(args)
    cmd = args.command
    if cmd == "prepare":
        if args.input:
            cfg.data.inputs = list(args.input)
        if args.sft_input:
            cfg.sft.inputs = list(args.sft_input)
        if args.text_field:
            cfg.data.text_field = args.text_field
        cfg.data.strict |= args.strict
        cfg.data.lowercase |= args.lowercase
        cfg.data.remove_stopwords |= args.remove_stopwords
        prepare(cfg, paths, args.force, args.shard, args.num_shards)
    elif cmd == "import":
        if not extra and not args.source:
            raise UserError("give what to import: a .gguf file, a Hugging Face model folder, or smollm2-135m")
        import_model(cfg, paths, args.source or extra[0], args.context, args.force)
    elif cmd == "merge":
        merge(cfg, paths, args.parts, args.force)
    elif cmd == "tokenizer":
        tokenizer(cfg, paths, args.force)
    elif cmd == "encode":
        encode(cfg, paths, args.force)
    elif cmd == "pretrain":
        return _exit_status(pretrain(cfg, paths, args.force, args.resume), "pretrain", paths)
    elif cmd == "finetune":
        return _exit_status(finetune(cfg, paths, args.force, args.resume, args.input, args.init, mode=args.mode, lora_rank=args.lora_rank,
                 lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_targets=args.lora_targets,
                 eval_prompts=args.eval_prompts), "finetune", paths)
    elif cmd == "eval":
        evaluate(cfg, paths, args.stage, args.checkpoint, args.file, args.stride, args.task, args.schema,
                 args.max_items, args.all_checkpoints)
    elif cmd == "generate":
        generate(cfg, paths, args.prompt, args.stage, args.checkpoint, args.chat)
    elif cmd == "chat":
        chat(cfg, paths, args.stage, args.checkpoint, args.system)
    elif cmd == "serve":
        serve_run(cfg, paths, args.stage, args.checkpoint, args.host, args.port, args.api_key, args.max_batch,
                  args.max_body_mb)
    elif cmd == "export":
        export(cfg, paths, args.out or (extra[0] if extra else None), args.stage, args.checkpoint, args.force,
               fmt=args.format, gguf_type=args.outtype)
    elif cmd == "embeddings":
        embeddings(cfg, paths, args.stage, args.checkpoint, args.near, args.plot, args.k)
    elif cmd == "report":
        print(f"report: {report(cfg, paths)}")
    elif cmd == "compare":
        from .report import compare_runs
        for r in args.runs:
            if not any((Path(r) / s / "metrics.jsonl").exists() for s in ("pretrain", "finetune")):
                raise UserError(f"{r} has no training metrics (pretrain/ or finetune/metrics.jsonl)")
        print(f"compare: {compare_runs(args.runs[0], args.runs[1], args.out)}")
    elif cmd == "demo":
        demo(cfg, paths, args.force)
    return 0
