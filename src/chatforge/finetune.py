"""Fine-tuning: adapt a pretrained model to a task (chat SFT) or a domain (continued pretraining), fully or
with LoRA, through the one training loop of pretraining, and measure that it worked.

Layout of paths.finetune:
  ckpt/            ordinary chatforge checkpoints (generate/chat/serve/export read these). With LoRA it holds
                   one checkpoint: the best adapter merged into the base weights.
  lora/            LoRA only: the training loop's own checkpoints (the PEFT-wrapped state dict, so resume
                   re-wraps the base before loading), metrics.jsonl.
  adapter/         LoRA only: the adapter alone, as PEFT writes it (adapter_model.safetensors, adapter_config.json).
  data/, tokens/   the fine-tuning data when given with --input (chat JSONL, or domain text and its shards).
  metrics.jsonl, loss.png, finetune_eval.json (before/after losses, end-of-turn share, replies).

Starting points: a chatforge checkpoint (default: the run's pretrain best), or a local Hugging Face
Llama/Qwen3 folder whose tokenizer carries chatforge's special tokens (chatforge exports do).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

from .config import Config
from .train import Plan
from .errors import UserError
from .paths import RunPaths

MODES = ("sft", "cpt", "dpo", "grpo")


def sft_examples(tok, path: Path, seq_len: int, too_long: str = "turns"):
    from .data.chat import render_examples
    RunPaths.need(path, "prepare")
    examples, stats = render_examples(tok, path, seq_len, too_long)
    if not examples:
        raise UserError(f"no usable chat examples in {path} ({stats}); check the file's format")
    return examples, stats


# ---------------------------------------------------------------- starting point

def _is_checkpoint(p: Path) -> bool:
    return (p / "meta.json").is_file() and (p / "model.safetensors").is_file()


def _hub_download(name: str) -> Path:
    """A hub name ("org/model") -> a local snapshot (config, safetensors, tokenizer files only)."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json",
                                                            "tokenizer.json", "tokenizer_config.json"]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: all the same to the user
        raise UserError(f"--init {name}: not a local folder and could not be fetched from the Hugging Face hub "
                        f"({type(e).__name__}); give a chatforge checkpoint or a local model folder") from None


def load_hf_start(hf_dir: Path, paths: RunPaths):
    """A local HF Llama/Qwen3 folder -> (GPT, Tokenizer). Its tokenizer (chatforge's format, or the model's own
    with its chat template) becomes the run's tokenizer (later stages read paths.tokenizer) unless the run
    already has another."""
    from .hub import read_hf
    from .tokenizer import Tokenizer

    model, tok, _ = read_hf(Path(hf_dir))
    if (paths.tokenizer / "tokenizer.json").is_file():
        run_tok = Tokenizer.load(paths.tokenizer)
        if run_tok.hash != tok.hash:
            raise UserError(f"{hf_dir}'s tokenizer differs from the run's ({paths.tokenizer}); fine-tune it in a "
                            f"new --run-dir")
    else:
        tok.save(paths.tokenizer)  # generate/chat/serve/export of this run read it from here
    return model, tok


def load_start(cfg: Config, paths: RunPaths):
    """(model, tokenizer, where it came from, "chatforge" | "hf") for finetune.init_from (--init), else the run's
    pretrained model, else its imported one."""
    from .checkpoint import list_checkpoints, load_model, resolve_checkpoint
    from .tokenizer import Tokenizer

    spec = cfg.finetune.init_from
    if not spec:  # the run's own model: pretrained here, else imported
        root = paths.pretrain if list_checkpoints(paths.pretrain / "ckpt") or not paths.imported.exists() \
            else paths.imported
        src = resolve_checkpoint(root / "ckpt", "best")
    else:
        src = Path(spec)
        if not src.exists():
            if spec.count("/") == 1 and not spec.startswith((".", "/")):
                src = _hub_download(spec)
            else:
                raise UserError(f"--init {spec}: not found; give a chatforge checkpoint, a run's ckpt folder or a "
                                f"Hugging Face model folder")
    if not _is_checkpoint(src):
        for root in (src, src / "ckpt", src / "pretrain" / "ckpt"):  # a ckpt folder, a stage folder, a run
            if list_checkpoints(root):
                src = resolve_checkpoint(root, "best")
                break
    if _is_checkpoint(src):
        tok = Tokenizer.load(paths.tokenizer)
        model, meta = load_model(src)
        if meta.get("tokenizer_hash") not in (None, tok.hash):
            raise UserError(f"checkpoint {src} was trained with another tokenizer ({meta.get('tokenizer_hash')}, "
                            f"this run's is {tok.hash}); fine-tune with the tokenizer it was trained with")
        return model, tok, src, "chatforge"
    if (src / "config.json").is_file():
        model, tok = load_hf_start(src, paths)
        return model, tok, src, "hf"
    raise UserError(f"--init {src}: neither a chatforge checkpoint (meta.json + model.safetensors) nor a Hugging "
                    f"Face model folder (config.json + safetensors + tokenizer.json)")


# ---------------------------------------------------------------- data

def _sft_dir(cfg: Config, paths: RunPaths, resume: bool) -> Path:
    inputs = cfg.finetune.inputs
    if not inputs:
        return paths.data
    from .data.chat import prepare_sft

    sft_dir = paths.finetune / "data"
    if not (resume and (sft_dir / "sft_train.jsonl").is_file()):
        prepare_sft(dataclasses.replace(cfg.sft, inputs=list(inputs)), sft_dir)
    return sft_dir


def _cpt_tokens(cfg: Config, paths: RunPaths, tok, resume: bool) -> Path:
    """Domain text -> cleaned documents (prepare's rules) -> token shards with the run's tokenizer (encode's
    code), in paths.finetune/{data,tokens}."""
    from .data.prepare import prepare_corpus
    from .data.shards import encode_documents

    data_dir, tok_dir, inputs = paths.finetune / "data", paths.finetune / "tokens", cfg.finetune.inputs
    if resume and (tok_dir / "stats.json").is_file():
        return tok_dir
    manifest = prepare_corpus(dataclasses.replace(cfg.data, inputs=list(inputs), weights=[]), data_dir)
    val_docs = manifest.get("splits", {}).get("val", {}).get("documents", 0)
    if not val_docs:
        raise UserError(f"the domain text ({', '.join(inputs)}) left no validation documents; give more documents "
                        f"or raise data.val_fraction (now {cfg.data.val_fraction})")
    encode_documents(tok, data_dir, tok_dir, cfg.data.workers)
    return tok_dir


# ---------------------------------------------------------------- evidence

def measure(model, device, *, domain: Callable[[], Iterable[dict]] | None,
            general: Callable[[], Iterable[dict]] | None, chat: Callable[[], Iterable[dict]] | None) -> dict:
    """Mean loss per target token on each validation set given (None when a set is unavailable)."""
    from .train import val_loss

    done: dict = {}  # chat SFT's domain and chat sets are the same: evaluated once
    out = {}
    for name, fn in (("domain_val_loss", domain), ("general_val_loss", general), ("chat_val_loss", chat)):
        if fn is not None and fn not in done:
            done[fn] = val_loss(model, fn(), device)
        out[name] = done.get(fn) if fn is not None else None
    return out


LABELS = {"end_of_turn_share": "end-of-turn share (generate settings)",
          "end_of_turn_share_greedy": "end-of-turn share (greedy)",
          "rouge_l": "ROUGE-L F1 vs references (greedy)"}


def _print_evidence(ev: dict) -> None:
    """Every number measured before and after (a mode's evidence may add its own: reward, accuracy, ...)."""
    from .report import print_table

    fmt = lambda v: "n/a" if v is None else str(v) if isinstance(v, int) else f"{v:.4f}"  # noqa: E731
    keys = [k for k in dict.fromkeys([*ev["before"], *ev["after"]])
            if all(isinstance(ev[w].get(k), (int, float, type(None))) for w in ("before", "after"))
            and not isinstance(ev["after"].get(k), bool)]
    rows = [{"metric": LABELS.get(k, k), "before": fmt(ev["before"].get(k)), "after": fmt(ev["after"].get(k))}
            for k in keys]
    print_table(rows, ["metric", "before", "after"], title=f"finetune ({ev['mode']}) evidence")


# ---------------------------------------------------------------- what each mode trains on and measures

def _general_eval(cfg: Config, paths: RunPaths, tok, seq_len: int):
    """Forgetting: the run's pretraining validation text, when it was encoded with this tokenizer."""
    from .data.loader import iter_eval_batches
    from .data.shards import token_arrays
    try:
        gen_val = token_arrays(paths.tokens / "val", tok)
    except UserError:
        return None
    return lambda: iter_eval_batches(gen_val, cfg.eval.batch_size, seq_len,
                                     max_batches=cfg.eval.max_batches or cfg.train.eval_batches)


def _chat_evidence(cfg: Config, paths: RunPaths, tok, device, chat_val_path: Path, domain, general, chat):
    from .evidence import held_out, reply_check
    prompts = held_out(chat_val_path, cfg.finetune.eval_prompts)

    def evidence(m) -> dict:
        out = measure(m, device, domain=domain, general=general, chat=chat)
        if prompts:
            out.update(reply_check(m, tok, prompts, cfg.generate, device, sampled=cfg.finetune.eval_sampled))
        return out
    return evidence


def _sft_plan(cfg: Config, paths: RunPaths, tok, dist, seq_len: int, resume: bool) -> Plan:
    from .data.loader import SFTLoader, iter_sft_eval_batches
    fcfg, bs, ebs = cfg.finetune, cfg.finetune.batch_size, cfg.eval.batch_size
    sft_dir = _sft_dir(cfg, paths, resume)
    train_ex, train_stats = sft_examples(tok, sft_dir / "sft_train.jsonl", seq_len, fcfg.too_long)
    val_ex, val_stats = sft_examples(tok, sft_dir / "sft_val.jsonl", seq_len, fcfg.too_long)
    manifest_path = sft_dir / "sft_manifest.json"
    skipped = json.loads(manifest_path.read_text()).get("skipped", {}) if manifest_path.is_file() else {}
    loader = SFTLoader(train_ex, bs, seq_len, pad_id=tok.pad_id, rank=dist.rank, world=dist.world, seed=fcfg.seed)
    train_val = lambda: iter_sft_eval_batches(val_ex, ebs, seq_len, pad_id=tok.pad_id,  # noqa: E731
                                              max_batches=fcfg.eval_batches)
    domain_eval = lambda: iter_sft_eval_batches(val_ex, ebs, seq_len, pad_id=tok.pad_id,  # noqa: E731
                                                max_batches=cfg.eval.max_batches)
    evidence = _chat_evidence(cfg, paths, tok, dist.device, sft_dir / "sft_val.jsonl", domain_eval,
                              _general_eval(cfg, paths, tok, seq_len), domain_eval)
    return Plan(loader, train_val, evidence,
                f"{train_stats['examples']} chat examples ({train_stats['truncated']} truncated, "
                f"{train_stats['dropped']} dropped; skipped while preparing: {skipped or 'none'})",
                {"sft_dir": str(sft_dir), "skipped": skipped, "train": train_stats, "val": val_stats})


def _cpt_plan(cfg: Config, paths: RunPaths, tok, dist, seq_len: int, resume: bool) -> Plan:
    from .data.loader import TokenLoader, iter_eval_batches, iter_sft_eval_batches
    from .data.shards import token_arrays
    fcfg, bs, ebs = cfg.finetune, cfg.finetune.batch_size, cfg.eval.batch_size
    tok_dir = _cpt_tokens(cfg, paths, tok, resume)
    try:
        loader = TokenLoader(token_arrays(tok_dir / "train", tok), bs, seq_len, rank=dist.rank, world=dist.world,
                             seed=fcfg.seed)
    except ValueError as e:
        raise UserError(f"domain text {', '.join(fcfg.inputs)}: {e}") from None
    dom_val = token_arrays(tok_dir / "val", tok)
    stats = json.loads((tok_dir / "stats.json").read_text())
    train_val = lambda: iter_eval_batches(dom_val, ebs, seq_len, max_batches=fcfg.eval_batches)  # noqa: E731
    domain_eval = lambda: iter_eval_batches(dom_val, ebs, seq_len, max_batches=cfg.eval.max_batches)  # noqa: E731
    chat_val_path = paths.data / "sft_val.jsonl"
    chat_eval = None
    if chat_val_path.is_file():
        chat_ex, _ = sft_examples(tok, chat_val_path, seq_len)
        chat_eval = lambda: iter_sft_eval_batches(chat_ex, ebs, seq_len, pad_id=tok.pad_id,  # noqa: E731
                                                  max_batches=cfg.eval.max_batches)
    evidence = _chat_evidence(cfg, paths, tok, dist.device, chat_val_path, domain_eval,
                              _general_eval(cfg, paths, tok, seq_len), chat_eval)
    return Plan(loader, train_val, evidence,
                f"{stats['train']['tokens']:,} domain tokens ({stats['val']['tokens']:,} held out)",
                {"tokens_dir": str(tok_dir), "tokens": {k: v.get("tokens") for k, v in stats.items()}})


# ---------------------------------------------------------------- the stage

def _check_resume(train_dir: Path, meta: dict) -> None:
    from .checkpoint import list_checkpoints, read_meta

    ckpts = list_checkpoints(train_dir / "ckpt")
    if not ckpts:
        return  # train() says what is missing
    saved = read_meta(ckpts[-1])
    if saved.get("lora_merged"):
        raise UserError(f"{train_dir / 'ckpt'} holds a merged LoRA model, not a resumable full fine-tune; resume "
                        f"with the same --lora-rank, or start again with --force")
    for key in ("mode", "lora"):
        if saved.get(key, meta[key] if key == "mode" else None) != meta[key]:
            raise UserError(f"{ckpts[-1]}/meta.json: {key} was {saved.get(key)}, this run asks for {meta[key]}; "
                            f"resume with the same settings or start again with --force")


def run_finetune(cfg: Config, paths: RunPaths, *, force: bool = False, resume: bool = False) -> dict:
    """Fine-tune as cfg.finetune says and write paths.finetune/finetune_eval.json; returns the training summary
    plus 'eval'.

    mode "sft": chat (inputs = chat JSONL files, default the run's prepared chat set); "cpt": continued
    pretraining (inputs = domain text, required); "dpo": preference pairs (dpo.py); "grpo": RL with verifiable
    rewards (grpo.py). lora_rank > 0: LoRA on lora_targets (default all seven
    projections) with lora_alpha (0 -> 2 * rank) and lora_dropout; else full fine-tuning.
    """
    import torch

    from .checkpoint import load_model, resolve_checkpoint, save_checkpoint
    from .distributed import setup, teardown
    from .evidence import eval_samples
    from .lora import LORA_TARGETS, LoraSettings, add_lora, merge_lora, save_adapter, trainable_counts
    from .report import plot_stage
    from .train import train

    fcfg = cfg.finetune
    mode, inputs = fcfg.mode, list(fcfg.inputs)
    lora_rank = fcfg.lora_rank
    if mode not in MODES:
        raise UserError(f"finetune mode {mode!r} is not known; use sft (chat), cpt (continued pretraining), dpo "
                        f"(preference pairs) or grpo (RL with verifiable rewards)")
    if lora_rank < 0:
        raise UserError(f"--lora-rank {lora_rank} must be >= 0 (0 = full fine-tuning)")
    lora = LoraSettings(lora_rank, fcfg.lora_alpha, fcfg.lora_dropout, list(fcfg.lora_targets or LORA_TARGETS)) \
        if lora_rank else None
    if mode == "cpt" and not inputs:
        raise UserError("continued pretraining (mode cpt) needs domain text: pass --input FILE_OR_FOLDER ...")
    if not resume:
        paths.guard(paths.finetune, force, "a fine-tuning run")
    train_dir = paths.finetune / "lora" if lora else paths.finetune

    dist = setup(cfg.finetune.device)
    device = dist.device
    model, tok, init_dir, origin = load_start(cfg, paths)
    # A chatforge model trains at its own context; an imported one at most at the run's (HF contexts are long).
    seq_len = model.cfg.seq_len if origin == "chatforge" else min(model.cfg.seq_len, cfg.model.seq_len)
    if fcfg.seq_len:  # a shorter training context (an imported model's own is long; its RoPE tables cover it)
        seq_len = min(seq_len, fcfg.seq_len)
    if mode in ("dpo", "grpo"):
        import importlib
        plan = importlib.import_module(f".{mode}", __package__).plan(cfg, paths, model, tok, dist, seq_len, resume)
    else:
        plan = _sft_plan(cfg, paths, tok, dist, seq_len, resume) if mode == "sft" else \
            _cpt_plan(cfg, paths, tok, dist, seq_len, resume)
    max_new = cfg.generate.max_new_tokens
    evidence = plan.evidence

    if dist.is_main:
        paths.save_config(cfg, "finetune")
        print(f"finetune ({mode}{f', LoRA rank {lora.rank}' if lora else ', full'}): {plan.summary}; "
              f"from {init_dir}")
    model.to(device)
    before = evidence(model)

    torch.manual_seed(cfg.finetune.seed)  # LoRA's A matrices: the same every run (resume overwrites them anyway)
    if lora:
        model = add_lora(model, lora)
        n_train, n_all = trainable_counts(model)
        if dist.is_main:
            print(f"LoRA: rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g} on "
                  f"{', '.join(lora.targets)}: {n_train:,} of {n_all:,} parameters train ({n_train / n_all:.2%})")
    if plan.bind is not None:
        plan.bind(model)
    meta = {"stage": "finetune", "mode": mode, "model": asdict(model.cfg), "tokenizer_hash": tok.hash,
            "init_from": str(init_dir), "init_kind": origin, "lora": lora.to_dict() if lora else None}
    if resume:
        _check_resume(train_dir, meta)
    summary = train(model, cfg.finetune, plan.loader, train_dir, val_batches=plan.val_batches, meta=meta,
                    resume=resume, on_eval=eval_samples(tok, cfg, chat=mode != "cpt"), dist=dist,
                    objective=plan.objective)
    if summary.get("interrupted"):  # stopped by a signal: no merge, no evidence; `--resume` finishes the run
        teardown()
        return {**summary, "eval": None}

    if lora:
        # The best adapter: save it alone, merge it, and store the merged model as an ordinary checkpoint.
        from safetensors.torch import load_model as st_load_model

        from .checkpoint import read_meta
        best = resolve_checkpoint(train_dir / "ckpt", "best")
        st_load_model(model, str(best / "model.safetensors"), device=str(device))
        best_meta = read_meta(best)
        if dist.is_main:
            save_adapter(model, paths.finetune / "adapter", base=str(init_dir))
        final = merge_lora(model).eval()
        if dist.is_main:
            shutil.rmtree(paths.finetune / "ckpt", ignore_errors=True)
            save_checkpoint(paths.finetune / "ckpt", best_meta["step"], final, None, None, None,
                            {**meta, "lora_merged": True, "adapter": str(paths.finetune / "adapter"),
                             "lora_checkpoint": str(best)}, val_loss=best_meta.get("val_loss"), keep_last=1)
            shutil.copyfile(train_dir / "metrics.jsonl", paths.finetune / "metrics.jsonl")
    else:
        final, _ = load_model(resolve_checkpoint(paths.finetune / "ckpt", "best"), device=device)
    after = evidence(final)

    result = {"mode": mode, "init_from": str(init_dir), "init_kind": origin, "lora": meta["lora"],
              "data": plan.data_info, "max_new_tokens": max_new, "before": before, "after": after,
              "train": summary}
    if dist.is_main:
        plot_stage(paths.finetune)
        (paths.finetune / "finetune_eval.json").write_text(json.dumps(result, indent=2, default=float))
        _print_evidence(result)
        if after.get("replies"):
            r = after["replies"][0]
            print(f"held-out prompt: {r['prompt'][:200]!r}\nreply: {r['reply_greedy'][:300]!r}")
    teardown()
    return {**summary, "eval": result}
