"""DPO training tokens/s: chatforge's objective vs TRL's DPOTrainer on the same model, batches and CPU.

Both sides: the same randomly initialised GPT (chatforge's, exported to a transformers folder for TRL), the same
preference batches (TRL's own tokenization and collator), fp32, reference log-probs from a frozen copy (TRL: a
ref model forward per step; chatforge: computed once up front, as finetune does, and not timed), AdamW steps of
forward + backward + update. Tokens are the non-padding tokens of both rows of every pair.

    python benchmarks/bench_dpo.py [--steps 10] [--batch 8] [--layers 4] [--embd 256] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from chatforge import dpo, machine
from chatforge.config import ModelConfig, TokenizerConfig
from chatforge.data.stdlib_corpus import stdlib_chat_examples
from chatforge.export import export_hf
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl

    print(machine.describe())
    tmp = Path(tempfile.mkdtemp(prefix="bench_dpo"))
    chats = stdlib_chat_examples(400)
    texts = [m["content"] for c in chats for m in c["messages"]] if chats and "messages" in chats[0] else \
        [str(c) for c in chats]
    Tokenizer.train(texts, TokenizerConfig(kind="bpe", vocab_size=2048, min_frequency=2)).save(tmp / "tok")
    tok = Tokenizer.load(tmp / "tok")
    records = []
    for i, c in enumerate(chats):
        msgs = c["messages"] if isinstance(c, dict) else c
        user = next(m for m in msgs if m["role"] == "user")["content"][:300]
        good = next(m for m in msgs if m["role"] == "assistant")["content"][:400]
        bad = next(m for m in chats[(i + 7) % len(chats)]["messages"] if m["role"] == "assistant")["content"][:400]
        if good != bad:
            records.append({"prompt": [{"role": "user", "content": user}],
                            "chosen": [{"role": "assistant", "content": good}],
                            "rejected": [{"role": "assistant", "content": bad}]})
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=args.layers, n_head=4, n_kv_head=2, n_embd=args.embd, seq_len=args.seq,
                      vocab_size=tok.vocab_size)
    ref = GPT(cfg).eval()
    export_hf(ref, tmp / "tok", tmp / "hf")
    print(f"model: {sum(p.numel() for p in ref.parameters()):,} parameters, {args.layers} layers x {args.embd}; "
          f"{args.batch} pairs/step, {args.steps} timed steps, {args.threads} threads, fp32")

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32)
    hf_ref = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32)
    htok = transformers.AutoTokenizer.from_pretrained(tmp / "hf")
    targs = trl.DPOConfig(output_dir=str(tmp / "trl"), report_to=[], beta=0.1, use_cpu=True, bf16=False,
                          max_length=args.seq, gradient_checkpointing=False)
    trainer = trl.DPOTrainer(model=hf, ref_model=hf_ref, args=targs, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=htok)
    ds = trainer.train_dataset
    n_batches = args.steps + 2
    examples = [[ds[(s * args.batch + i) % len(ds)] for i in range(args.batch)] for s in range(n_batches)]
    examples = [[e for e in ex if len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) <= args.seq]
                for ex in examples]

    # TRL: its collator, compute_loss (policy + ref forward), AdamW.
    trl_batches = [trainer.data_collator(ex) for ex in examples]
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    hf.train()

    def trl_step(b):
        loss = trainer.compute_loss(hf, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    tokens = [int(b["attention_mask"].sum()) for b in trl_batches]
    for b in trl_batches[:2]:
        trl_step(b)
    t0 = time.perf_counter()
    for b in trl_batches[2:]:
        trl_step(b)
    trl_s = time.perf_counter() - t0

    # chatforge: the same ids, reference precomputed (as finetune's plan does), DPOObjective, AdamW.
    pairs = [[{"prompt_ids": e["prompt_ids"], "chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"]}
              for e in ex] for ex in examples]
    for ps in pairs:
        dpo.reference_logps(ref, ps, tok.pad_id, "cpu")
    model = copy.deepcopy(ref).train()
    obj = dpo.DPOObjective(0.1, "sigmoid")
    cf_batches = [dpo.collate(ps, tok.pad_id) for ps in pairs]
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def cf_step(b):
        loss = obj.loss(model, b) / obj.count(b)
        loss.backward()
        opt2.step()
        opt2.zero_grad(set_to_none=True)
    for b in cf_batches[:2]:
        cf_step(b)
    t0 = time.perf_counter()
    for b in cf_batches[2:]:
        cf_step(b)
    cf_s = time.perf_counter() - t0

    n = sum(tokens[2:])
    print(f"TRL DPOTrainer : {n / trl_s:10,.0f} tok/s ({trl_s:.2f} s, {n:,} tokens)")
    print(f"chatforge DPO  : {n / cf_s:10,.0f} tok/s ({cf_s:.2f} s)")
    print(f"ratio chatforge/TRL: {trl_s / cf_s:.2f}x (chatforge's reference forward is precomputed once; TRL's runs "
          f"every step here)")


if __name__ == "__main__":
    main()
