"""chatforge's HellaSwag scoring against lm-evaluation-harness on a real model, item by item.

Exports a run's model to a Hugging Face folder and scores the same HellaSwag records (the local validation
sample in ../shared/data/hellaswag) twice: lm-eval's own hellaswag task (process_docs, its requests
(context, " " + ending), process_results: acc = argmax ll, acc_norm = argmax ll / len(ending)) on
`--model hf`, and `chatforge eval`'s scoring (tasks.load_items + score_multiple_choice). Prints both scores,
the largest per-choice log-likelihood difference, the items whose picks differ, and each side's time.
    python benchmarks/check_lm_eval.py RUN [--items 100] [--stage auto]   (e.g. RUN from `chatforge import smollm2-135m`)
Needs `pip install "lm-eval[hf]" datasets`; without them, or without the data, it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag" / "hellaswag_val_sample1000_raw.jsonl"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--stage", default="auto")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if not args.data.is_file():
        print(f"skipped: {args.data} is absent")
        return 0
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # nothing may reach the network
    try:
        import datasets
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks.hellaswag import utils as hs_utils
    except ImportError as e:
        print(f"skipped: {e} (pip install \"lm-eval[hf]\" datasets)")
        return 0
    from chatforge import tasks
    from chatforge.export import export_hf
    from chatforge.machine import cpu
    from chatforge.paths import RunPaths
    from chatforge.tokenizer import Tokenizer
    from chatforge.use import chat_paths, load_run_model

    if args.threads:
        torch.set_num_threads(args.threads)
    name, flags = cpu()
    print(f"CPU: {name}; flags: {' '.join(flags)}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    paths = chat_paths(RunPaths(args.run), args.stage)
    model, _, ckpt = load_run_model(paths, args.stage, "best")
    model.eval()
    tok = Tokenizer.load(paths.tokenizer)
    recs = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines()[:args.items]]
    items = tasks.load_items(args.data, "hellaswag")[:args.items]
    docs = hs_utils.process_docs(datasets.Dataset.from_list(recs))
    theirs_items = [(d["query"], d["choices"], d["gold"]) for d in docs]
    same_items = [(it["context"], [e[1:] for e in it["endings"]], it["label"]) for it in items] == theirs_items
    print(f"model: {ckpt} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params); {len(items)} items; "
          f"lm-eval's process_docs gives the same contexts/endings/labels as chatforge's load_items: {same_items}")

    t = time.perf_counter()
    ours = tasks.score_multiple_choice(model, tok, items, batch_size=8)
    t_ours = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_hf(model, paths.tokenizer, Path(tmp) / "hf")
        lm = HFLM(pretrained=str(folder), device="cpu", batch_size=8, dtype="float32",
                  add_bos_token=bool(getattr(tok, "add_bos", True)))
        reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(ctx, " " + c), idx=i)
                for ctx, choices, _ in theirs_items for i, c in enumerate(choices)]
        t = time.perf_counter()
        lls_all = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
        t_theirs = time.perf_counter() - t
    acc = acc_norm = 0.0
    worst, differ, at = 0.0, [], 0
    for n, ((_, choices, label), p) in enumerate(zip(theirs_items, ours["predictions"])):
        lls = np.array(lls_all[at:at + len(choices)])
        at += len(choices)
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / np.array([float(len(c)) for c in choices])))
        acc += pred == label
        acc_norm += pred_norm == label
        worst = max(worst, float(np.abs(np.array(p["lls"]) - lls).max()))
        if (p["pred"], p["pred_norm"]) != (pred, pred_norm):
            differ.append(n)
    k = len(theirs_items)
    print(f"chatforge: acc {ours['acc']:.4f} acc_norm {ours['acc_norm']:.4f} ({t_ours:.1f} s)")
    print(f"lm-eval:   acc {acc / k:.4f} acc_norm {acc_norm / k:.4f} ({t_theirs:.1f} s)")
    print(f"largest per-choice log-likelihood difference {worst:.2e}; items whose picks differ: {len(differ)} {differ[:10]}")
    print(f"time ratio lm-eval/chatforge: {t_theirs / t_ours:.2f}x")
    return 0


if __name__ == "__main__":
    from chatforge.errors import UserError
    try:
        sys.exit(main())
    except UserError as e:  # a missing or unfinished run: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
