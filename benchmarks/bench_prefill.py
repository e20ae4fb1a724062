"""Generation in fp32 vs bf16 autocast on this CPU: prompt (prefill) time and decode tokens/s.

    .venv/bin/python benchmarks/bench_prefill.py [--prompts 32,128,512] [--rounds 5] [--threads 0] [--new-tokens 48]
Models: chatforge's demo shape (configs/demo.yaml: 4 layers, width 192, 6/2 q/kv heads, vocab 4096; context 1024
so that a 512-token prompt fits) and SmolLM2-135M when its GGUF file is already in the cache (no download).
Prints the machine, what generate.precision=auto chooses here and why, then per prompt length the best prefill
time of each (rounds alternate the order; best, as other jobs share the machine) and fp32/bf16, and decode
tokens/s (batch 1 and 8) through GPT.forward in fp32 and in bf16 autocast, beside the engine's own single-row step
(cpu_decode, fp32), which is what batch-1 generation uses.
"""
from __future__ import annotations

import argparse
import time

import torch

from chatforge import machine
from chatforge.config import ModelConfig, TokenizerConfig
from chatforge.distributed import autocast_ctx
from chatforge.engine import Engine
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer


def prefill_time(engine: Engine, ids: torch.Tensor) -> float:
    cache = engine.new_cache(ids.shape[0], ids.shape[1])
    t = time.perf_counter()
    engine.prefill(ids, cache)
    return time.perf_counter() - t


def decode_rate(engine: Engine, batch: int, n: int, how: str) -> float:
    """Tokens/s (all rows) of n greedy steps after a 16-token prompt; how: "lean" (Engine.decode_step: cpu_decode's
    single-row step), "fp32" or "bf16" (GPT.forward, the latter under bf16 autocast)."""
    m = engine.model
    cache = engine.new_cache(batch, 16 + n + 1)
    ids = torch.randint(0, m.cfg.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        nxt = engine.prefill(ids, cache).argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(n):
            if how == "lean":
                logits = engine.decode_step(nxt, cache, greedy=True)
            else:
                with autocast_ctx("cpu", how):
                    logits = m(nxt, kv_cache=cache)[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
        return batch * n / (time.perf_counter() - t)


def bench(name: str, model: GPT, tok: Tokenizer, prompts: list[int], rounds: int, new_tokens: int) -> None:
    model = model.eval()
    eng = {p: Engine(model, tok, precision=p) for p in ("fp32", "bf16")}
    auto = Engine(model, tok, precision="auto")
    c = model.cfg
    print(f"\n{name}: {c.n_layer} layers, width {c.n_embd}, {c.n_head}/{c.n_kv_head} q/kv heads, vocab "
          f"{c.vocab_size}, {model.num_params() / 1e6:.1f}M params; generate.precision=auto -> {auto.precision_why}")
    g = torch.Generator().manual_seed(0)
    for T in prompts:
        ids = torch.randint(0, c.vocab_size, (1, T), generator=g)
        for e in eng.values():
            prefill_time(e, ids)  # warm-up
        best = {p: float("inf") for p in eng}
        for r in range(rounds):
            for p in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
                best[p] = min(best[p], prefill_time(eng[p], ids))
        print(f"  prefill {T:4d} tokens: fp32 {best['fp32'] * 1e3:7.1f} ms, bf16 autocast {best['bf16'] * 1e3:7.1f} ms"
              f"  -> bf16 {best['fp32'] / best['bf16']:.2f}x fp32 (best of {rounds})")
    for batch in (1, 8):
        hows = ("lean", "fp32", "bf16") if batch == 1 else ("fp32", "bf16")
        rate = {h: 0.0 for h in hows}
        decode_rate(eng["fp32"], batch, 4, "lean" if batch == 1 else "fp32")  # warm-up (builds the lean weights)
        for r in range(max(rounds // 2, 2)):
            for h in (hows if r % 2 == 0 else hows[::-1]):
                rate[h] = max(rate[h], decode_rate(eng["fp32"], batch, new_tokens, h))
        lean = f"engine step (fp32, cpu_decode) {rate['lean']:6.1f}, " if batch == 1 else ""
        print(f"  decode batch {batch}: {lean}GPT.forward fp32 {rate['fp32']:6.1f}, bf16 autocast {rate['bf16']:6.1f} "
              f"tokens/s -> bf16 {rate['bf16'] / rate['fp32']:.2f}x forward fp32"
              + (f", {rate['bf16'] / rate['lean']:.2f}x the engine step" if batch == 1 else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default="32,128,512", help="prompt lengths (tokens), comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=48, help="decode steps per timing")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--no-smollm2", action="store_true")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    print(machine.describe())
    prompts = [int(v) for v in a.prompts.split(",")]
    tok = Tokenizer.train([argparse.__doc__ or "", time.__doc__ or ""] * 4, TokenizerConfig(kind="char"))
    torch.manual_seed(0)
    demo = GPT(ModelConfig(n_layer=4, n_head=6, n_kv_head=2, n_embd=192, seq_len=1024, vocab_size=4096))
    bench("chatforge demo shape", demo, tok, prompts, a.rounds, a.new_tokens)
    if a.no_smollm2:
        return
    from pathlib import Path

    from chatforge.hub import KNOWN, cache_dir, read_gguf
    path = cache_dir() / "models" / Path(KNOWN["smollm2-135m"]["file"]).name
    if not path.is_file():
        print(f"\nSmolLM2-135M: skipped ({path} is not in the cache; `chatforge import smollm2-135m` fetches it)")
        return
    model, stok, _ = read_gguf(path)
    bench("SmolLM2-135M (GGUF Q4_1, dequantized to fp32)", model, stok, prompts, a.rounds, a.new_tokens)


if __name__ == "__main__":
    main()
