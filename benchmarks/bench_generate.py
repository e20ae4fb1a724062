"""Batch-1 greedy generation speed: chatforge Engine vs transformers generate() on the exported model.

Same weights, same prompt, same number of new tokens; the greedy tokens must be identical.
    python benchmarks/bench_generate.py [--layers 4 --width 256 --new-tokens 200 --threads 1 --rounds 7]
Both run with the same torch thread count; the ratio printed is the median over paired rounds.
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from chatforge.config import ModelConfig, TokenizerConfig
from chatforge.distributed import pick_device
from chatforge.engine import Engine
from chatforge.export import export_hf
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def paired_rounds(ours, theirs, rounds: int) -> tuple[list[float], list[float], object, object]:
    """Times of both per round, run back to back with the order alternating each round.

    On a shared machine the load drifts; a pair run seconds apart sees about the same load, so the per-round
    ratio is steadier than either time, and its median ignores the odd round hit by a burst.
    """
    a, b = ours(), theirs()  # warm-up: allocator, kernels, lazy imports, fused weights
    t_ours, t_theirs = [], []
    for r in range(rounds):
        order = [(ours, t_ours), (theirs, t_theirs)]
        for fn, times in (order if r % 2 == 0 else order[::-1]):
            times.append(timed(fn)[0])
    return t_ours, t_theirs, a, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=0, help="key/value heads (grouped-query attention); 0: --heads")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7, help="paired rounds (ours, theirs alternating)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for both (batch-1 decoding of a small model is fastest on one)")
    args = ap.parse_args()
    import transformers

    device = pick_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # A small BPE vocabulary trained on Python's own source: no downloads, realistic tokens.
    texts = [inspect.getsource(m) for m in (json, argparse, inspect)]
    tok = Tokenizer.train(texts, TokenizerConfig(vocab_size=2048, min_frequency=2))
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=args.layers, n_head=args.heads, n_kv_head=args.kv_heads or args.heads,
                      n_embd=args.width,
                      seq_len=args.seq_len, vocab_size=tok.vocab_size, init_std=0.1)
    model = GPT(cfg).eval()
    prompt = [tok.bos_id] + tok.encode("def main() -> None:\n    parser = argparse.")

    with tempfile.TemporaryDirectory() as d:
        tok.save(Path(d) / "tok")
        export_hf(model, Path(d) / "tok", Path(d) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(d) / "hf", dtype=torch.float32).to(device).eval()
    hf.generation_config.eos_token_id = None  # else its unset fields fall back to these: stops at a random <|end|>
    engine = Engine(model, tok, device=device)
    gcfg = transformers.GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                         pad_token_id=tok.pad_id, bos_token_id=tok.bos_id)
    x = torch.tensor([prompt], device=device)

    def ours():
        return engine.generate(prompt, max_new_tokens=args.new_tokens, temperature=0)[0]

    def theirs():
        with torch.inference_mode():
            return hf.generate(x, generation_config=gcfg, attention_mask=torch.ones_like(x))[0, len(prompt):].tolist()

    t_ours, t_hf, a, b = paired_rounds(ours, theirs, args.rounds)
    assert len(a) == len(b) == args.new_tokens, (len(a), len(b))
    assert a == b, "greedy tokens differ between chatforge and transformers"
    n = args.new_tokens
    med = statistics.median
    ratios = sorted(h / o for o, h in zip(t_ours, t_hf))
    print(f"model: {args.layers} layers, width {args.width}, {cfg.n_head}/{cfg.n_kv_head} q/kv heads, "
          f"{model.num_params() / 1e6:.2f}M params, "
          f"device {device}, {torch.get_num_threads()} CPU threads (both), {n} new tokens, batch 1, greedy")
    print(f"chatforge Engine:        {n / med(t_ours):8.1f} tokens/s ({med(t_ours) * 1000 / n:.2f} ms/token, median)")
    print(f"transformers generate(): {n / med(t_hf):8.1f} tokens/s ({med(t_hf) * 1000 / n:.2f} ms/token, median)")
    print(f"identical greedy tokens: yes ({n})")
    print(f"speed ratio chatforge/transformers: {med(ratios):.2f}x median of {len(ratios)} paired rounds "
          f"(min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x)")


if __name__ == "__main__":
    from chatforge.machine import describe
    print(describe(), flush=True)
    main()
