"""Chat fine-tuning recipe on the shared data: pretrain a small model on TinyStories, then SFT on Alpaca +
LIMA + GSM8K (the `sft-alpaca` preset), and print the evidence: chat val loss before/after, general
(TinyStories val) loss before/after, the share of held-out replies that end with <|end|>, and GSM8K exact
match on GSM8K problems held out by the SFT split (not the official test set; shared/data/heldout is never read).

    .venv/bin/python benchmarks/bench_sft.py [--pretrain-steps 800] [--finetune-steps 3000] [--lora-rank 0]
                                             [--gsm8k-items 50] [--run-dir DIR] [--threads 2]

Stages run through the same functions as the CLI, in a temporary run directory unless --run-dir is given
(an existing run there is reused up to its pretraining checkpoint). Expect GSM8K exact match near 0 for a
model of this size: it learns the answer format ("... #### N"), not arithmetic.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def gsm8k_val_items(sft_val: Path, gsm_path: Path) -> list[dict]:
    """GSM8K problems that the SFT split held out (by question hash), as scorer items."""
    from chatforge.tasks import extract_answer

    items = []
    for line in sft_val.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if not rec.get("source", "").startswith(str(gsm_path)):
            continue
        q = next(m["content"] for m in rec["messages"] if m["role"] == "user")
        a = next(m["content"] for m in rec["messages"] if m["role"] == "assistant")
        items.append({"question": q, "answer": a, "gold": extract_answer(a)})
    return items


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrain-steps", type=int, default=800)
    ap.add_argument("--finetune-steps", type=int, default=3000)
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--gsm8k-items", type=int, default=50)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is absent: this benchmark needs the shared data beside the project")
    torch.set_num_threads(a.threads)

    from chatforge import stages
    from chatforge.tasks import score_gsm8k
    from chatforge.checkpoint import list_checkpoints, load_model, resolve_checkpoint
    from chatforge.config import load_config
    from chatforge.engine import Engine
    from chatforge.finetune import run_finetune
    from chatforge.paths import RunPaths
    from chatforge.tokenizer import Tokenizer

    gsm = DATA / "gsm8k" / "train.jsonl"
    sft = [DATA / "sft" / "alpaca_cleaned_first5000.json", DATA / "sft" / "lima.json", gsm]
    root = Path(a.run_dir) if a.run_dir else Path(tempfile.mkdtemp(prefix="bench_sft_")) / "run"
    cfg = load_config("sft-alpaca", [f"data.inputs=[{DATA / 'tinystories'}]", f"sft.inputs=[{','.join(map(str, sft))}]",
                                     f"train.steps={a.pretrain_steps}", f"finetune.steps={a.finetune_steps}"])
    paths = RunPaths(root)
    t0 = time.time()
    if not list_checkpoints(paths.pretrain / "ckpt"):
        stages.prepare(cfg, paths, force=True)
        stages.tokenizer(cfg, paths, force=True)
        stages.encode(cfg, paths, force=True)
        stages.pretrain(cfg, paths, force=True)
    t_pre = time.time() - t0
    t1 = time.time()
    out = run_finetune(cfg, paths, force=True, lora_rank=a.lora_rank)
    t_ft = time.time() - t1
    ev = out["eval"]

    t2 = time.time()
    tok = Tokenizer.load(paths.tokenizer)
    model, _ = load_model(resolve_checkpoint(paths.finetune / "ckpt", "best"))
    items = gsm8k_val_items(paths.data / "sft_val.jsonl", gsm)
    g = score_gsm8k(Engine(model, tok), tok, items, max_new_tokens=cfg.model.seq_len, max_items=a.gsm8k_items, chat=True)
    t_gsm = time.time() - t2

    b, f = ev["before"], ev["after"]
    print(f"\n== bench_sft: {root} (pretrain {a.pretrain_steps} steps {t_pre:.0f} s; finetune "
          f"{'LoRA r' + str(a.lora_rank) if a.lora_rank else 'full'} {a.finetune_steps} steps {t_ft:.0f} s incl. "
          f"evidence; GSM8K {t_gsm:.0f} s; {torch.get_num_threads()} CPU threads)")
    print(f"chat val loss        {b['chat_val_loss']:.4f} -> {f['chat_val_loss']:.4f}")
    print(f"general val loss     {b['general_val_loss']:.4f} -> {f['general_val_loss']:.4f}  (TinyStories val: forgetting)")
    print(f"end-of-turn share    {b['end_of_turn_share']:.0%} -> {f['end_of_turn_share']:.0%}  "
          f"({f['prompts']} held-out prompts, <= {ev['max_new_tokens']} new tokens, sampled as `chatforge chat` "
          f"does: {f['decoding']})")
    print(f"  greedy             {b['end_of_turn_share_greedy']:.0%} -> {f['end_of_turn_share_greedy']:.0%}")
    print(f"GSM8K exact match    {g['exact_match']:.1%} +- {g['se']:.1%} on {g['n']} held-out train problems")
    for r in f["replies"][:3]:
        print(f"  Q: {r['prompt'][:100]!r}\n  A: {r['reply'][:200]!r} (ended: {r['ended_with_end_of_turn']})")
    s = g["samples"][0]
    print(f"  GSM8K: {s['question'][:100]!r}\n  A: {s['reply'][:200]!r} (pred {s['pred']}, gold {s['gold']})")


if __name__ == "__main__":
    from chatforge.machine import describe
    print(describe(), flush=True)
    main()
