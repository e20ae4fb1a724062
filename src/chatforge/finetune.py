"""Fine-tuning: adapt a pretrained model to chat (SFT) through the one training loop of pretraining."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .config import Config
from .errors import UserError
from .paths import RunPaths
from .stages import _guard, _need, _plot, _save_cfg


def sft_examples(tok, path: Path, seq_len: int):
    from .data.chat import render_examples
    _need(path, "prepare")
    examples, stats = render_examples(tok, path, seq_len)
    if not examples:
        raise UserError(f"no usable chat examples in {path} ({stats}); check the file's format")
    return examples, stats


def run_finetune(cfg: Config, paths: RunPaths, *, force: bool = False, resume: bool = False,
                 inputs: list[str] | None = None, init: str | None = None, lora_rank: int = 0) -> dict:
    import torch

    from .checkpoint import load_model, resolve_checkpoint
    from .data.loader import SFTLoader, iter_sft_eval_batches
    from .distributed import setup, teardown
    from .tokenizer import Tokenizer
    from .train import train

    if lora_rank:
        raise UserError("LoRA fine-tuning is not available yet; run without --lora-rank for full fine-tuning")
    tok = Tokenizer.load(paths.tokenizer)
    if inputs:
        from .data.prepare import prepare_sft
        sft_cfg = cfg.sft
        sft_cfg.inputs = list(inputs)
        sft_dir = paths.finetune / "data"
        if not resume:
            _guard(paths.finetune, force, "a fine-tuning run")
        prepare_sft(sft_cfg, sft_dir)
    else:
        sft_dir = paths.data
        if not resume:
            _guard(paths.finetune, force, "a fine-tuning run")
    init_dir = Path(init or cfg.finetune.init_from or resolve_checkpoint(paths.pretrain / "ckpt", "best"))
    if not init_dir.exists():
        raise UserError(f"checkpoint {init_dir} not found; run `chatforge pretrain` first or pass --init")
    dist = setup(cfg.finetune.device)
    model, meta = load_model(init_dir)
    if meta.get("tokenizer_hash") not in (None, tok.hash):
        raise UserError(f"checkpoint {init_dir} was trained with another tokenizer ({meta.get('tokenizer_hash')}, "
                        f"this run's is {tok.hash}); fine-tune with the tokenizer it was trained with")
    seq_len = model.cfg.seq_len
    train_ex, train_stats = sft_examples(tok, sft_dir / "sft_train.jsonl", seq_len)
    val_ex, _ = sft_examples(tok, sft_dir / "sft_val.jsonl", seq_len)
    if dist.is_main:
        _save_cfg(cfg, paths)
        print(f"finetune: {train_stats['examples']} chat examples ({train_stats.get('truncated', 0)} truncated, "
              f"{train_stats.get('dropped', 0)} dropped), from {init_dir}")
    torch.manual_seed(cfg.finetune.seed)
    loader = SFTLoader(train_ex, cfg.finetune.batch_size, seq_len, pad_id=tok.pad_id,
                       rank=dist.rank, world=dist.world, seed=cfg.finetune.seed)

    def val_batches():
        return iter_sft_eval_batches(val_ex, cfg.eval.batch_size, seq_len, pad_id=tok.pad_id)

    meta = {"stage": "finetune", "model": asdict(model.cfg), "tokenizer_hash": tok.hash, "init_from": str(init_dir)}
    summary = train(model, cfg.finetune, loader, paths.finetune, val_batches=val_batches, meta=meta,
                    resume=resume, dist=dist)
    if dist.is_main:
        _plot(paths.finetune)
    teardown()
    return summary


