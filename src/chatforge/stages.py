"""The stages that build a run, as functions of (config, run directory): prepare, merge, tokenizer, encode,
pretrain, import, finetune. Each reads only what earlier stages left in the run directory, so any stage can be
re-run alone, and each saves the config it ran with (RunPaths.save_config).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from .config import Config
from .errors import UserError
from .paths import RunPaths


def _console():
    from rich.console import Console
    return Console()


def prepare(cfg: Config, paths: RunPaths, force: bool = False, shard: int | None = None, num_shards: int = 1) -> dict:
    from .data.chat import prepare_sft
    from .data.prepare import prepare_corpus

    if shard is not None and not 0 <= shard < num_shards:
        raise UserError(f"--shard {shard} must be between 0 and --num-shards - 1 ({num_shards - 1})")
    paths.guard(paths.data, force, "prepared data")
    paths.save_config(cfg, "prepare")
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
    from .data.chat import prepare_sft
    from .data.merge import merge_parts

    paths.guard(paths.data, force, "prepared data")
    paths.save_config(cfg, "merge")
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
    from .data.documents import iter_documents
    from .tokenizer import Tokenizer, compression_report
    from .tokenizer_train import reference_bytes_per_token

    paths.need(paths.data / "manifest.json", "prepare")
    paths.guard(paths.tokenizer, force, "a tokenizer")
    paths.save_config(cfg, "tokenizer")
    t0 = time.time()
    tok = Tokenizer.train(iter_documents(paths.data, "train"), cfg.tokenizer)
    tok.save(paths.tokenizer)
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
    from .data.shards import encode_documents
    from .tokenizer import Tokenizer

    paths.need(paths.data / "manifest.json", "prepare")
    tok = Tokenizer.load(paths.tokenizer)
    paths.guard(paths.tokens, force, "token shards")
    paths.save_config(cfg, "encode")
    stats = encode_documents(tok, paths.data, paths.tokens, cfg.data.workers,
                             executor=cfg.data.executor, ray_address=cfg.data.ray_address)
    for split, s in stats.items():
        print(f"encode {split}: {s['tokens']:,} tokens in {s['docs']:,} documents")
    return stats


def _model_config(cfg: Config, tok) -> None:
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                        f"{tok.vocab_size}; set model.vocab_size=0 to take it from the tokenizer")


def pretrain(cfg: Config, paths: RunPaths, force: bool = False, resume: bool = False) -> dict:
    import torch

    from .data.loader import TokenLoader, iter_eval_batches
    from .data.shards import token_arrays
    from .distributed import setup, teardown
    from .evidence import eval_samples
    from .model import GPT
    from .report import plot_stage
    from .tokenizer import Tokenizer
    from .train import train

    tok = Tokenizer.load(paths.tokenizer)
    paths.need(paths.tokens / "train", "encode")
    _model_config(cfg, tok)
    if not resume and not force:
        paths.guard(paths.pretrain, force, "a pretraining run")  # refuse before any work
    dist = setup(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    if dist.is_main:
        print(f"model: {model.num_params():,} parameters, {model.flops_per_token() / 1e6:.1f} MFLOPs per token "
              f"(training), context {cfg.model.seq_len}")
    loader = TokenLoader.from_dir(paths.tokens / "train", cfg.train.batch_size, cfg.model.seq_len,
                                  rank=dist.rank, world=dist.world, seed=cfg.train.seed,
                                  tok_hash=tok.hash, vocab_size=tok.vocab_size)
    val = token_arrays(paths.tokens / "val", tok)
    if not resume and force:  # only now, with everything above checked, is the old run removed
        paths.guard(paths.pretrain, force, "a pretraining run")
    if dist.is_main:
        paths.save_config(cfg, "pretrain")

    def val_batches():
        return iter_eval_batches(val, cfg.eval.batch_size, cfg.model.seq_len, max_batches=cfg.train.eval_batches)

    meta = {"stage": "pretrain", "model": asdict(cfg.model), "tokenizer_hash": tok.hash}
    summary = train(model, cfg.train, loader, paths.pretrain, val_batches=val_batches, meta=meta,
                    resume=resume, dist=dist, on_eval=eval_samples(tok, cfg, chat=False))
    if dist.is_main:
        plot_stage(paths.pretrain)
    teardown()
    return summary


def finetune(cfg: Config, paths: RunPaths, force: bool = False, resume: bool = False) -> dict:
    from .finetune import run_finetune
    return run_finetune(cfg, paths, force=force, resume=resume)


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
    paths.guard(paths.tokenizer, force, "a tokenizer")
    paths.guard(paths.imported, force, "an imported model")
    cfg.model = model.cfg
    for key, value in info.get("sampling", {}).items():  # the model's own recommended decoding, if it states one
        setattr(cfg.generate, key, value)
    paths.save_config(cfg, "import")
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
    if info.get("sampling"):
        print("  sampling: the model's own, " + ", ".join(f"generate.{k}={v}" for k, v in info["sampling"].items()))
    return info
