"""Before/after evidence of chat fine-tuning: replies to held-out questions, scored.

One rule for every caller (finetune's before/after, the demo's answers, the report): a reply "ended" when its
last token is the model's end-of-turn token (chatforge's <|end|>, ChatML's <|im_end|>), within the token limit
and the context. ROUGE-L F1 (Google's rouge-score package: LCS over lowercased words, Porter stemming) compares
greedy replies with the held-out reference answers.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

BATCH = 16  # prompts decoded together: a 135M model decodes 16 rows at ~6x the tokens/s of one (CPU)
SAMPLE_PROMPTS = ["def ", "import ", "class "]
SAMPLE_QUESTIONS = ["What does os.path.join do?", "What is the json module for?"]


def eval_samples(tok, cfg, chat: bool):
    """The training loop's on_eval hook: fixed-prompt samples (seeded) at each evaluation, stored in
    metrics.jsonl beside the losses, so a run shows what its model writes as it learns."""
    def on_eval(model, step):
        from .engine import Engine
        eng = Engine(model, tok, device=str(next(model.parameters()).device))
        if chat:
            prompts = SAMPLE_QUESTIONS
            ids = [tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0] for q in prompts]
        else:
            prompts = SAMPLE_PROMPTS
            ids = [tok.with_bos(tok.encode(p)) for p in prompts]
        g = cfg.generate
        outs = eng.generate(ids, max_new_tokens=min(48, g.max_new_tokens), temperature=g.temperature, top_k=g.top_k,
                            seed=g.seed, stop_ids=tok.stop_ids)
        return [{"prompt": p, "text": (p if not chat else "") + tok.decode(o)} for p, o in zip(prompts, outs)]
    return on_eval


def held_out(sft_val: Path, n: int) -> list[dict]:
    """n conversations spread evenly over a prepared sft_val.jsonl (which lists its sources one after another,
    so the head would be one source only), each cut before its first assistant turn: {"messages", "reference"}."""
    out: list[dict] = []
    if n <= 0 or not Path(sft_val).is_file():
        return out
    with open(sft_val, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            msgs = json.loads(line)["messages"]
            k = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), None)
            if k:
                out.append({"messages": msgs[:k], "reference": msgs[k]["content"]})
    return [out[i * len(out) // n] for i in range(n)] if len(out) > n else out


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    return _scorer().score(reference, prediction)["rougeL"].fmeasure


def _decode(engine, prompts: list[list[int]], limit: int, **sampling) -> list[list[int]]:
    """Replies to many prompts, BATCH at a time (rows of a batch decode as they would alone). A prompt with less
    than `limit` tokens of room left in the context decodes alone, up to the context's end."""
    seq_len = engine.seq_len
    out: list[list[int] | None] = [None] * len(prompts)
    roomy = [i for i, p in enumerate(prompts) if len(p) + limit <= seq_len]
    for k in range(0, len(roomy), BATCH):
        rows = roomy[k:k + BATCH]
        got = engine.generate([prompts[i] for i in rows], max_new_tokens=limit, stop_ids=engine.tok.stop_ids,
                              **sampling)
        for i, g in zip(rows, got):
            out[i] = g
    for i, p in enumerate(prompts):
        if out[i] is None:
            out[i] = engine.generate(p, max_new_tokens=seq_len - len(p), stop_ids=engine.tok.stop_ids, **sampling)[0]
    return out


def reply_check(model, tok, items: list[dict], gen, device="cpu", sampled: bool = True) -> dict:
    """Replies to held-out items ({"messages", "reference"}): greedy, and (sampled=True) decoded as `chatforge
    chat` does with the run's generate settings (seeded). Shares that end at end-of-turn within
    gen.max_new_tokens and the context; mean ROUGE-L F1 of the greedy replies against the references."""
    from .engine import Engine

    engine = Engine(model, tok, device=str(device))
    limit = gen.max_new_tokens
    fits, skipped = [], 0
    for it in items:
        ids = tok.render_chat(it["messages"], add_generation_prompt=True)[0]
        if len(ids) >= model.cfg.seq_len:  # the prompt alone fills the context
            skipped += 1
            continue
        fits.append((it, ids))
    prompts = [ids for _, ids in fits]
    greedy = _decode(engine, prompts, limit, temperature=0.0)
    samples = _decode(engine, prompts, limit, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                      repetition_penalty=gen.repetition_penalty, seed=gen.seed) if sampled else [None] * len(fits)
    replies = []
    for (it, _), g, s in zip(fits, greedy, samples):
        text = tok.decode(g)
        r = {"prompt": it["messages"][-1]["content"], "reference": it.get("reference"), "reply_greedy": text,
             "greedy_ended_with_end_of_turn": bool(g) and g[-1] == tok.end_id, "tokens_greedy": len(g)}
        if it.get("reference") is not None:
            r["rouge_l"] = rouge_l(text, it["reference"])
        if s is not None:
            r.update(reply=tok.decode(s), ended_with_end_of_turn=bool(s) and s[-1] == tok.end_id, tokens=len(s))
        replies.append(r)

    def mean(key: str) -> float | None:
        vals = [r[key] for r in replies if key in r]
        return sum(vals) / len(vals) if vals else None

    return {"end_of_turn_share": mean("ended_with_end_of_turn"),
            "end_of_turn_share_greedy": mean("greedy_ended_with_end_of_turn"),
            "rouge_l": mean("rouge_l"),
            "decoding": {"temperature": gen.temperature, "top_k": gen.top_k, "top_p": gen.top_p,
                         "repetition_penalty": gen.repetition_penalty, "seed": gen.seed, "max_new_tokens": limit},
            "prompts": len(replies), "prompts_too_long": skipped, "replies": replies}
