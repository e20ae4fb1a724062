"""Fine-tuning speed on a real pretrained model: chatforge vs Hugging Face transformers (+ PEFT), CPU, fp32.

    .venv/bin/python benchmarks/bench_pretrained_train.py [--mode both|full|lora] [--rounds 3] [--steps 5]
        [--batch 8] [--seq 128] [--layout packed|padded] [--threads 2] [--no-profile] [--lr-full 2e-5]
        [--lr-lora 2e-4] [--model smollm2-135m]

Model: SmolLM2-135M-Instruct (Llama, 30 layers, width 576, tied embeddings), read from its GGUF by
chatforge.hub.read_gguf. The transformers peer is a LlamaForCausalLM built from the same config and loaded
with the *same* fp32 tensors (so the two start bit-for-bit equal; the script checks the logits agree).

Data: chat examples (user -> assistant) rendered with the model's own tokenizer and chat template
(ChatML), loss mask = assistant tokens. Source: ../shared/data/sft/alpaca_cleaned_first5000.json when present
(the first --examples records), else a small built-in Q/A list. (../shared/data/heldout is never read.)
Batches come from chatforge's SFTLoader, drawn once and given to both peers in the same order:
  layout=packed (default, what `chatforge finetune` does): several conversations per row of --seq positions,
      chatforge gets doc_ids + position_ids; transformers gets the same position_ids (restarting at 0 at every
      conversation and at the padding) with attention_mask=None, which transformers turns into the same
      block-diagonal causal mask (masking_utils.find_packed_sequence_indices). Same tokens, same attention.
  layout=padded: one conversation per row, right-padded; both peers use plain causal attention (the
      padding is after every real token, so it changes nothing the loss sees).
Targets: y = next token where the loss mask is 1, else -100. transformers gets labels=y, shift_labels=y
(already shifted, so its loss_function does not shift again): both losses are the mean cross-entropy over
exactly the same target tokens.

Step (both peers): forward, loss (mean over targets), backward, clip_grad_norm_(1.0), AdamW step with weight
decay 0.1 on >= 2-D parameters only, zero_grad(set_to_none). chatforge: loss_sum + build_optimizer (fused
torch AdamW); transformers: model(...).loss + torch.optim.AdamW(fused=True) with the same groups, lr and betas
(fused AdamW is transformers' Trainer default for torch >= 2.8, and its default decay grouping excludes norms,
the same split). LoRA: r=16, alpha=32, dropout 0 on all 7 projections, chatforge.lora.add_lora vs
peft.get_peft_model(LlamaForCausalLM); lora_A is copied from chatforge's adapter so both start equal.

Tokens/s = batch x seq positions per step (padding included, the same count for both) / step wall time; the
target-token count per step is printed too. Peers alternate inside one process (the machine is shared and
noisy), each round runs --steps steps of each peer (order flipped every round) and the ratio per round is
chatforge / transformers; medians over rounds are reported. One extra step of each peer is profiled
(torch.profiler, top ops by self CPU time) unless --no-profile.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IGNORE = -100
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

BUILTIN_QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name three primary colors.", "Red, blue and yellow are the traditional primary colors."),
    ("How many days are in a leap year?", "A leap year has 366 days: February has 29 days instead of 28."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("Give a synonym for 'happy'.", "A synonym for 'happy' is 'joyful'."),
    ("Why is the sky blue?", "Sunlight is scattered by the molecules of the air, and blue light is scattered much more "
                             "than red light because its wavelength is shorter, so the sky looks blue."),
    ("Translate 'thank you' into Spanish.", "'Thank you' in Spanish is 'gracias'."),
    ("What is 12 times 12?", "12 times 12 is 144."),
    ("Write a haiku about rain.", "Soft rain on the roof,\nthe garden drinks in silence,\nclouds drift to the east."),
    ("Explain what photosynthesis is in one sentence.", "Photosynthesis is the process by which plants use sunlight, "
                                                        "water and carbon dioxide to make sugar and oxygen."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius (212 degrees "
                                                         "Fahrenheit) at sea level."),
    ("Suggest a name for a pet goldfish.", "How about 'Bubbles'? It is short, cheerful and suits a goldfish."),
]


# ---------------------------------------------------------------- environment

def cpu_facts() -> dict:
    name, flags = platform.processor() or "?", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("?", "", platform.processor()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    simd = [f for f in flags if f.startswith(("avx", "fma", "amx", "sse4"))]
    return {"cpu": name, "simd_flags": " ".join(simd)}


# ---------------------------------------------------------------- data

def chat_examples(tok, n: int) -> tuple[list[tuple[list[int], list[int]]], str]:
    path = DATA / "sft" / "alpaca_cleaned_first5000.json"
    convs = []
    if path.is_file():
        for r in json.loads(path.read_text(encoding="utf-8"))[:n]:
            user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
            convs.append([{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}])
        source = f"{path} (first {len(convs)} records)"
    else:
        convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in BUILTIN_QA]
        source = f"built-in list ({len(convs)} Q/A pairs; {path} absent)"
    return [tok.render_chat(c) for c in convs], source


def draw_batches(examples, tok, batch: int, seq: int, n: int, packed: bool) -> list[dict]:
    from chatforge.data.loader import SFTLoader

    loader = SFTLoader(examples, batch, seq, pad_id=tok.pad_id, seed=0, pack=packed)
    return [loader.next_batch() for _ in range(n)]


def hf_inputs(b: dict) -> dict:
    kw = {"input_ids": b["x"], "labels": b["y"], "shift_labels": b["y"]}
    if "position_ids" in b:  # packed: transformers derives the block-diagonal mask from the position restarts
        kw["position_ids"] = b["position_ids"]
    return kw


# ---------------------------------------------------------------- models

def hf_twin(model):
    """A transformers LlamaForCausalLM with the config and the very tensors (copied) of a chatforge GPT."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    hcfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.hidden(),
                       num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                       max_position_embeddings=c.seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                       tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False,
                       attention_dropout=0.0, head_dim=c.head_dim, torch_dtype="float32")
    hcfg.rope_parameters = {"rope_type": "default", "rope_theta": c.rope_theta}
    hcfg._attn_implementation = "sdpa"
    # Training: no KV cache. With use_cache=True (the config default) transformers 5 builds a DynamicCache even in
    # training, and create_causal_mask skips the packed-sequence detection when a cache is given: packed rows would
    # silently attend across conversations (measured: logits off by up to 22 at the second conversation).
    hcfg.use_cache = False
    with torch.device("meta"):
        hf = LlamaForCausalLM(hcfg)
    hf = hf.to_empty(device="cpu")
    sd = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v.detach().clone()
          for k, v in model.state_dict().items()}
    if c.tie_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (c.tie_embeddings and k == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    if c.tie_embeddings:
        hf.tie_weights()
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    hf.model.rotary_emb.__init__(hcfg)  # its inv_freq buffer was on meta: recompute on the CPU
    return hf.float()


def fresh_pair(base_state: dict, make_cf, mode: str, lr: float, wd: float, seed: int):
    """(chatforge model, its optimizer, transformers model, its optimizer), equal weights (and adapters)."""
    from chatforge.config import TrainConfig
    from chatforge.lora import LoraSettings, add_lora
    from chatforge.optim import build_optimizer, param_groups

    cf = make_cf()
    cf.load_state_dict(base_state, strict=False)
    hf = hf_twin(cf)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        cf = add_lora(cf, LoraSettings(rank=16, alpha=32, dropout=0.0, targets=list(TARGETS)))
        torch.manual_seed(seed)
        hf = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(TARGETS),
                                           bias="none"))
        cf_lora = {k.split("base_model.model.", 1)[1]: v for k, v in cf.named_parameters() if "lora_" in k}
        n = 0
        with torch.no_grad():
            for k, v in hf.named_parameters():
                if "lora_" in k:
                    v.copy_(cf_lora[k.split("base_model.model.model.", 1)[1]])
                    n += 1
        assert n == len(cf_lora) == 30 * 7 * 2, (n, len(cf_lora))
    cf.train()
    hf.train()
    tc = TrainConfig(lr=lr, weight_decay=wd, beta1=0.9, beta2=0.95)
    cf_opt = build_optimizer(cf, tc)
    hf_opt = torch.optim.AdamW(param_groups(hf, wd), lr=lr, betas=(0.9, 0.95), fused=True)
    return cf, cf_opt, hf, hf_opt


def cf_step(model, opt, b, clip: float) -> float:
    from chatforge.train import loss_sum

    s, n = loss_sum(model, b)
    (s / n).backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(s.detach()) / n


def hf_step(model, opt, b, clip: float) -> float:
    loss = model(**hf_inputs(b)).loss
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# ---------------------------------------------------------------- profiling

def profile_step(fn, label: str, rows: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    ka = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ka) / 1e6
    cats = {"gemm (mm/addmm/bmm/linear)": 0.0, "attention (sdpa)": 0.0, "optimizer (fused adamw)": 0.0,
            "cross-entropy/softmax": 0.0, "embedding": 0.0, "copies/cat/index": 0.0, "other (elementwise...)": 0.0}
    for e in ka:
        k, t = e.key, e.self_cpu_time_total / 1e6
        if any(s in k for s in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")):
            cats["gemm (mm/addmm/bmm/linear)"] += t
        elif "attention" in k or "sdpa" in k or "flash" in k:
            cats["attention (sdpa)"] += t
        elif "adam" in k.lower():
            cats["optimizer (fused adamw)"] += t
        elif any(s in k for s in ("log_softmax", "nll_loss", "softmax")):
            cats["cross-entropy/softmax"] += t
        elif "embedding" in k:
            cats["embedding"] += t
        elif any(s in k for s in ("aten::copy_", "aten::cat", "aten::index", "aten::clone", "aten::contiguous",
                                  "aten::masked", "aten::where", "aten::zero_", "aten::fill_")):
            cats["copies/cat/index"] += t
        elif k.startswith("aten::") or "Backward" in k:
            cats["other (elementwise...)"] += t
    print(f"\n--- profile: {label}: one step, wall {wall:.2f} s (profiled), self CPU total {total:.2f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))
    print("  by category (self CPU s): " + ", ".join(f"{k} {v:.2f}" for k, v in cats.items()))
    top = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in
           sorted(ka, key=lambda e: -e.self_cpu_time_total)[:rows]]
    return {"wall": wall, "categories": cats, "top": top}


# ---------------------------------------------------------------- main

def run_mode(mode: str, a, base_state, make_cf, batches, seq_tokens) -> dict:
    lr = a.lr_lora if mode == "lora" else a.lr_full
    cf, cf_opt, hf, hf_opt = fresh_pair(base_state, make_cf, mode, lr, a.weight_decay, a.seed)
    if mode == "lora":
        trainable = sum(p.numel() for p in cf.parameters() if p.requires_grad)
        print(f"[{mode}] trainable parameters: chatforge {trainable:,}, transformers "
              f"{sum(p.numel() for p in hf.parameters() if p.requires_grad):,}")
    # Same start: logits on the first batch (no grad).
    b0 = batches[0]
    with torch.no_grad():
        kw = {k: b0[k] for k in ("doc_ids", "position_ids") if k in b0}
        lc = cf(b0["x"], **kw)
        lh = hf(**{k: v for k, v in hf_inputs(b0).items() if k not in ("labels", "shift_labels")}).logits
        keep = b0["y"] != IGNORE
        diff = float((lc[keep] - lh[keep]).abs().max())
    print(f"[{mode}] start: max |logit difference| at target positions {diff:.2e}")
    peers = {"chatforge": (cf, cf_opt, cf_step), "transformers": (hf, hf_opt, hf_step)}
    losses = {p: [] for p in peers}
    times = {p: [] for p in peers}
    # One untimed warm-up step each (first touch: optimizer state, allocator); its loss is the first-step check.
    for p, (model, opt, step) in peers.items():
        losses[p].append(step(model, opt, batches[0], a.clip))
    ks = {p: 1 for p in peers}  # batch index per peer (both see the same sequence)
    for r in range(a.rounds):
        order = list(peers) if r % 2 == 0 else list(peers)[::-1]
        for p in order:
            model, opt, step = peers[p]
            t = []
            for _ in range(a.steps):
                b = batches[ks[p] % len(batches)]
                t0 = time.perf_counter()
                losses[p].append(step(model, opt, b, a.clip))
                t.append(time.perf_counter() - t0)
                ks[p] += 1
            times[p].append(t)
        tps = {p: seq_tokens * a.steps / sum(times[p][-1]) for p in peers}
        print(f"[{mode}] round {r + 1}/{a.rounds}: chatforge {tps['chatforge']:.1f} tok/s, transformers "
              f"{tps['transformers']:.1f} tok/s, ratio {tps['chatforge'] / tps['transformers']:.3f}  "
              f"(step s: cf {', '.join(f'{x:.2f}' for x in times['chatforge'][-1])} | "
              f"hf {', '.join(f'{x:.2f}' for x in times['transformers'][-1])})", flush=True)
    per_round = {p: [seq_tokens * a.steps / sum(t) for t in times[p]] for p in peers}
    ratios = [c / h for c, h in zip(per_round["chatforge"], per_round["transformers"])]
    step_med = {p: statistics.median([x for t in times[p] for x in t]) for p in peers}
    lc_, lh_ = losses["chatforge"], losses["transformers"]
    first = abs(lc_[0] - lh_[0])
    worst = max(abs(x - y) for x, y in zip(lc_, lh_))
    res = {
        "mode": mode, "lr": lr,
        "tok_s_median": {p: statistics.median(v) for p, v in per_round.items()},
        "ratio_median": statistics.median(ratios), "ratios": ratios,
        "step_s_median": step_med,
        "ratio_from_step_medians": step_med["transformers"] / step_med["chatforge"],
        "first_loss": {"chatforge": lc_[0], "transformers": lh_[0], "abs_diff": first, "ok_1e-4": first < 1e-4},
        "last_loss": {"chatforge": lc_[-1], "transformers": lh_[-1]},
        "max_abs_loss_diff_all_steps": worst,
        "losses": {p: [round(x, 5) for x in v] for p, v in losses.items()},
    }
    print(f"[{mode}] losses chatforge    {' '.join(f'{x:.4f}' for x in lc_)}")
    print(f"[{mode}] losses transformers {' '.join(f'{x:.4f}' for x in lh_)}")
    print(f"[{mode}] first-step loss diff {first:.2e} ({'OK' if first < 1e-4 else 'FAIL'} < 1e-4); max diff over "
          f"{len(lc_)} steps {worst:.2e}")
    print(f"[{mode}] MEDIAN tok/s: chatforge {res['tok_s_median']['chatforge']:.1f}, transformers "
          f"{res['tok_s_median']['transformers']:.1f}; ratio (median of per-round ratios) "
          f"{res['ratio_median']:.3f}; ratio of median step times {res['ratio_from_step_medians']:.3f}")
    if a.profile:
        b = batches[ks["chatforge"] % len(batches)]
        res["profile"] = {
            "chatforge": profile_step(lambda: cf_step(cf, cf_opt, b, a.clip), f"{mode} chatforge", a.profile_rows),
            "transformers": profile_step(lambda: hf_step(hf, hf_opt, b, a.clip), f"{mode} transformers",
                                         a.profile_rows)}
    del cf, cf_opt, hf, hf_opt
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("both", "full", "lora"), default="both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="steps per peer per round")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layout", choices=("packed", "padded"), default="packed")
    ap.add_argument("--examples", type=int, default=2000, help="Alpaca records to render")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--lr-full", type=float, default=2e-5)
    ap.add_argument("--lr-lora", type=float, default=2e-4)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient clipping (chatforge's default); 0 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--profile-rows", type=int, default=18)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    import peft
    import transformers

    from chatforge.hub import fetch_named, read_gguf
    from chatforge.model import GPT

    env = {**cpu_facts(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    print("env: " + json.dumps(env))
    t0 = time.perf_counter()
    model, tok, info = read_gguf(fetch_named(a.model))
    print(f"model: {info.get('name')} from {info['source']} ({time.perf_counter() - t0:.1f} s), "
          f"{model.num_params() / 1e6:.1f}M params, context {model.cfg.seq_len}")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = model.cfg
    del model

    def make_cf():
        with torch.device("meta"):
            m = GPT(cfg)
        m = m.to_empty(device="cpu")
        from chatforge.model import rope_tables
        m.rope_cos, m.rope_sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        if cfg.tie_embeddings:
            m.lm_head.weight = m.embed_tokens.weight
        return m

    examples, source = chat_examples(tok, a.examples)
    n_batches = a.rounds * a.steps + 2
    batches = draw_batches(examples, tok, a.batch, a.seq, n_batches, a.layout == "packed")
    seq_tokens = a.batch * a.seq
    tgt = [int((b["y"] != IGNORE).sum()) for b in batches]
    pad = [int(((b["y"] == IGNORE) & (b["x"] == tok.pad_id)).sum()) for b in batches]
    docs = [int(b["doc_ids"].max(dim=1).values.sum()) if "doc_ids" in b else a.batch for b in batches]
    print(f"data: {len(examples)} conversations from {source}; layout {a.layout}; {n_batches} batches of "
          f"{a.batch}x{a.seq} = {seq_tokens} positions (tokens/s counts these); targets per batch median "
          f"{statistics.median(tgt)} ({statistics.median(tgt) / seq_tokens:.0%}), pad-id positions median "
          f"{statistics.median(pad)}, segments (incl. padding) per batch median {statistics.median(docs)}")

    results = {"env": env, "data": {"source": source, "layout": a.layout, "batch": a.batch, "seq": a.seq,
                                    "targets_per_batch": tgt}}
    for mode in (("full", "lora") if a.mode == "both" else (a.mode,)):
        print(f"\n=== mode {mode} ===")
        results[mode] = run_mode(mode, a, base_state, make_cf, batches, seq_tokens)

    print("\n=== summary ===")
    print(f"env: {env['cpu']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
          f"threads {env['threads']}")
    for mode in ("full", "lora"):
        if mode in results:
            r = results[mode]
            print(f"{mode:4s}: chatforge {r['tok_s_median']['chatforge']:.1f} tok/s, transformers "
                  f"{r['tok_s_median']['transformers']:.1f} tok/s, ratio {r['ratio_median']:.3f} "
                  f"(per round {', '.join(f'{x:.3f}' for x in r['ratios'])}); first loss "
                  f"{r['first_loss']['chatforge']:.5f} vs {r['first_loss']['transformers']:.5f} "
                  f"(diff {r['first_loss']['abs_diff']:.1e}); last loss {r['last_loss']['chatforge']:.4f} vs "
                  f"{r['last_loss']['transformers']:.4f}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    from chatforge.machine import describe
    print(describe(), flush=True)
    main()
