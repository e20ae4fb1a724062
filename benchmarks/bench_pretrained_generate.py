"""Batch-1 greedy generation speed on a real model: chatforge Engine vs transformers generate() (SmolLM2-135M).

Both read the same GGUF file (Q4_1, dequantized to fp32 by each); the greedy tokens must be identical.
    python benchmarks/bench_pretrained_generate.py [--new-tokens 96 --rounds 5 --threads 1] [--int4] [--ppl]
With llama-cpp-python importable, llama.cpp decodes the same file too (its own Q4_1 kernels; timed, its
tokens counted against fp32 but not required to match).
Rounds alternate the order of the engines; the ratio printed is the median of the per-round ratios (on a
shared machine the load drifts: a pair run back to back sees about the same). --int4 also times
Engine(weights="int4") (its tokens may differ: counted, not required); --ppl measures the perplexity of
fp32 and int4 single-row decoding on some text (Python's own documentation strings, no download), teacher
forced through the decode step itself (the path that generates), and with evaluate_text for reference.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from chatforge.engine import Engine
from chatforge.machine import cpu

PROMPTS = {  # name -> (kind, text): chat turns are rendered with the chat template
    "chat": ("chat", "Write a short poem about the sea."),
    "code": ("plain", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    "prose": ("plain", "The history of the Roman Empire began when"),
    "chat-facts": ("chat", "What is the capital of France, and why is it famous?"),
}


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def decode_nll(engine: Engine, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] through the engine's single-row decode step (teacher forced)."""
    cache = engine.new_cache(1, len(ids))
    nll = 0.0
    with torch.inference_mode():
        logits = engine.prefill(torch.tensor([ids[:1]]), cache)
        for t in range(1, len(ids)):
            nll -= float(logits.float().log_softmax(-1)[0, ids[t]])
            if t + 1 < len(ids):
                logits = engine.decode_step(torch.tensor([[ids[t]]]), cache)
    return nll, len(ids) - 1


def ppl_texts(n_docs: int) -> list[str]:
    import argparse as a, collections, functools, json, logging, pathlib, statistics as s, textwrap  # noqa: E401
    docs = [m.__doc__ for m in (a, collections, functools, json, logging, pathlib, s, textwrap) if m.__doc__]
    return [d for d in docs if len(d) > 400][:n_docs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a chatforge.hub known name, or a .gguf path")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5, help="paired rounds (ours, theirs alternating)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both (0: torch's default)")
    ap.add_argument("--prompts", default=",".join(PROMPTS), help=f"comma-separated, of {', '.join(PROMPTS)}")
    ap.add_argument("--int4", action="store_true", help="also time Engine(weights='int4')")
    ap.add_argument("--ppl", action="store_true", help="perplexity of fp32 and int4 decoding (slow: ~1 min)")
    ap.add_argument("--ppl-docs", type=int, default=4)
    ap.add_argument("--ppl-tokens", type=int, default=384, help="tokens per document for --ppl")
    args = ap.parse_args()
    from pathlib import Path

    from chatforge.errors import UserError
    from chatforge.hub import fetch_named, read_gguf

    try:
        path = Path(args.model) if args.model.endswith(".gguf") else fetch_named(args.model)
    except (UserError, KeyError) as e:
        print(f"skipped: {args.model} could not be fetched ({e})")
        return
    try:
        import transformers
    except ImportError:
        print("skipped: transformers is not installed")
        return
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, tok, _ = read_gguf(path)
    engine = Engine(model, tok)
    q_engine = Engine(model, tok, weights="int4") if args.int4 or args.ppl else None
    try:  # optional peer: llama-cpp-python compiles llama.cpp (~25 min), so it is never a dependency
        import llama_cpp
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False)
        print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__} on the same file")
    except ImportError:
        llm = None
        print("llama.cpp: llama-cpp-python not installed (pip install llama-cpp-python: compiles ~25 min); skipped")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    n = args.new_tokens
    cpu_name, flags = cpu()
    print(f"CPU: {cpu_name}; flags: {' '.join(flags) or '-'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads (both); transformers {transformers.__version__}")
    print(f"model: {path.name}, {model.num_params() / 1e6:.1f}M params; batch 1, greedy, {n} new tokens, fp32")

    ratios_all, q_ratios_all = [], []
    for name in args.prompts.split(","):
        kind, text = PROMPTS[name]
        ids = (tok.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)[0] if kind == "chat"
               else tok.encode(text))
        x = torch.tensor([ids])

        def ours():
            return engine.generate(ids, max_new_tokens=n, temperature=0)[0]

        def quant():
            return q_engine.generate(ids, max_new_tokens=n, temperature=0)[0]

        def theirs():
            with torch.inference_mode():  # attention_mask: else the prompt's <|im_end|> (= pad) counts as padding
                return hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, eos_token_id=None,
                                   pad_token_id=tok.pad_id, max_new_tokens=n)[0, len(ids):].tolist()

        runs = {"chatforge": ours, "transformers": theirs} | ({"int4": quant} if args.int4 else {})
        if llm is not None:
            def llama():  # llama.cpp on the file as it is (Q4_1 kernels), greedy
                out = []
                for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                    out.append(int(t))
                    if len(out) == n:
                        break
                return out
            runs["llama.cpp"] = llama
        outs = {k: fn() for k, fn in runs.items()}  # warm-up: allocator, kernels, prepared weights
        if outs["chatforge"] != outs["transformers"]:
            print(f"{name}: greedy tokens DIFFER between chatforge and transformers")
            sys.exit(1)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(args.rounds):
            for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                times[k].append(timed(runs[k])[0])
        med = statistics.median
        ratios = [h / o for o, h in zip(times["chatforge"], times["transformers"])]
        ratios_all += ratios
        line = (f"{name:10s} prompt {len(ids):3d} tok | chatforge {n / med(times['chatforge']):6.1f} tok/s, "
                f"transformers {n / med(times['transformers']):6.1f} tok/s, ratio {med(ratios):.2f}x "
                f"(min {min(ratios):.2f}, max {max(ratios):.2f}), tokens identical")
        if args.int4:
            q_ratios = [h / q for q, h in zip(times["int4"], times["transformers"])]
            q_ratios_all += q_ratios
            same = sum(a == b for a, b in zip(outs["int4"], outs["transformers"]))
            first = next((i for i, (a, b) in enumerate(zip(outs["int4"], outs["transformers"])) if a != b), None)
            line += (f" | int4 {n / med(times['int4']):6.1f} tok/s, {med(q_ratios):.2f}x, "
                     f"same tokens up to {n if first is None else first} ({same}/{n} equal)")
        if llm is not None:
            same = sum(a == b for a, b in zip(outs["llama.cpp"], outs["transformers"]))
            line += (f" | llama.cpp (Q4_1) {n / med(times['llama.cpp']):6.1f} tok/s, chatforge fp32 at "
                     f"{med(times['llama.cpp']) / med(times['chatforge']):.2f}x of it"
                     + (f", int4 at {med(times['llama.cpp']) / med(times['int4']):.2f}x" if args.int4 else "")
                     + f" ({same}/{n} tokens equal to fp32)")
        print(line, flush=True)
    print(f"speed ratio chatforge/transformers: {statistics.median(ratios_all):.2f}x "
          f"(median of {len(ratios_all)} paired rounds over all prompts)")
    if q_ratios_all:
        print(f"speed ratio chatforge int4/transformers: {statistics.median(q_ratios_all):.2f}x")

    if args.ppl:
        from chatforge.evaluate import evaluate_text

        docs = [tok.encode(d)[:args.ppl_tokens] for d in ppl_texts(args.ppl_docs)]
        res = {}
        for label, eng in (("fp32", engine), ("int4", q_engine)):
            nll, cnt = map(sum, zip(*(decode_nll(eng, d) for d in docs)))
            res[label] = math.exp(nll / cnt)
        ref = evaluate_text(model, tok, [tok.decode(d) for d in docs], seq_len=args.ppl_tokens + 1)
        ref_ppl = ref.get("ppl", math.exp(ref["loss"])) if isinstance(ref, dict) else float("nan")
        print(f"perplexity on {len(docs)} Python docstrings ({cnt} tokens), single-row decode: "
              f"fp32 {res['fp32']:.4f}, int4 {res['int4']:.4f} ({100 * (res['int4'] / res['fp32'] - 1):+.2f}%); "
              f"evaluate_text (fp32 forward) {ref_ppl:.4f}")


if __name__ == "__main__":
    from chatforge.machine import describe
    print(describe(), flush=True)
    main()
