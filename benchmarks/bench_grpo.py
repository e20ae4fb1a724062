"""GRPO sampling throughput: completions/s of chatforge's GroupLoader.next_batch (engine KV-cache batched
sampling + rewards + advantages) vs TRL GRPOTrainer._generate_and_score_completions (transformers generate +
rewards + advantages) on the same tiny model (exported to HF), batch, prompts and CPU.

    .venv/bin/python benchmarks/bench_grpo.py [--prompts 4] [--group 8] [--max-new 32] [--reps 3]
Both decode every completion to max_new tokens (no stop token is likely from a random model, and TRL's are
taken from the generation config; min_new is not forced), so the numbers compare decoding speed, not lengths.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from chatforge import machine
from chatforge import rewards as R
from chatforge.config import GRPOConfig, ModelConfig, TokenizerConfig
from chatforge.export import export_hf
from chatforge.grpo import GroupLoader, Scorer, Stats, encode_items
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(machine.describe())
    d = Path(tempfile.mkdtemp())
    items = R.addition_items(plain=False)
    Tokenizer.train([it["prompt"] + f" {it['answer']}" for it in items[:2000]],
                    TokenizerConfig(kind="bpe", vocab_size=512, min_frequency=1)).save(d / "tok")
    tok = Tokenizer.load(d / "tok")
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, seq_len=128, vocab_size=tok.vocab_size)
    model = GPT(cfg)
    n = a.prompts * a.group
    print(f"model {model.num_params():,} params; {a.prompts} prompts x {a.group} = {n} completions of "
          f"{a.max_new} tokens per batch")

    g = GRPOConfig(task="addition", group=a.group, prompts_per_step=a.prompts, max_new_tokens=a.max_new)
    task = R.get_task("addition")
    enc, _ = encode_items(tok, task.items, cfg.seq_len)
    loader = GroupLoader(enc, tok, g, Scorer(task), Stats(), cfg.seq_len, seed=0)
    loader.bind(model)
    loader.next_batch()  # warm-up
    t = time.perf_counter()
    for _ in range(a.reps):
        b = loader.next_batch()
    ours = a.reps * n / (time.perf_counter() - t)
    print(f"chatforge: {ours:.1f} completions/s ({b['x'].shape[1]} columns)")

    try:
        import datasets
        import transformers
        import trl
    except ImportError as e:
        print(f"TRL comparison skipped: {e}")
        return
    out = export_hf(model, d / "tok", d / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # same lengths as ours (a random model rarely stops early)
    prompts = [[{"role": "user", "content": it["prompt"]}] for it, _ in enc[:a.prompts * (a.reps + 1)]]
    args = trl.GRPOConfig(output_dir=str(d / "trl"), report_to=[], per_device_train_batch_size=n,
                          num_generations=a.group, max_completion_length=a.max_new, use_cpu=True, bf16=False,
                          temperature=1.0, top_k=0, top_p=1.0)
    trainer = trl.GRPOTrainer(model=hf, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                              args=args, train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                              processing_class=transformers.AutoTokenizer.from_pretrained(out))
    trainer.model.eval()

    def batch(k: int) -> list[dict]:
        return [{"prompt": p} for p in prompts[k * a.prompts:(k + 1) * a.prompts] for _ in range(a.group)]

    trainer._generate_and_score_completions(batch(0))  # warm-up
    t = time.perf_counter()
    for k in range(a.reps):
        trainer._generate_and_score_completions(batch(k + 1))
    theirs = a.reps * n / (time.perf_counter() - t)
    print(f"TRL GRPOTrainer: {theirs:.1f} completions/s")
    print(f"ratio chatforge / TRL: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
