"""`chatforge improve RUN --task T --rounds N`: find what the model gets wrong, and learn from it (DPO).

One round:
  1. score the run's latest model (greedy replies) on the task's training items, and on its held-out items;
  2. every training item it gets wrong (score below the threshold) becomes a preference pair: chosen = the
     item's reference answer (or, without one, the best of a few sampled replies that scores at or above the
     threshold), rejected = the model's own wrong reply; written to RUN/improve/round_K/pairs.jsonl;
  3. DPO on those pairs (finetune mode dpo, full or LoRA as finetune.* says), starting from a copy of the
     model in RUN/improve/round_K/init; the result becomes the run's fine-tuned model (RUN/finetune);
  4. re-score the held-out items: the before -> after row of the round's table.
The next round starts from that model. RUN/improve/summary.json keeps every round's numbers.

Tasks:
  chat              the run's own prepared chat set (e.g. the stdlib docstring Q&A): sft_train.jsonl items,
                    sft_val.jsonl held out; score = ROUGE-L F1 of the reply against the reference answer
  gsm8k             GSM8K-format JSONL of training problems (--data FILE: question, answer ending "#### N";
                    required: the registered gsm8k task is the test split); score = 1 when the reply's "#### N" or last number matches (lm-eval's
                    strict or flexible extraction), else 0
  FILE.py:FUNCTION  a user scorer FUNCTION(prompt, completion, **item) -> float over --data FILE.jsonl records
                    ({"prompt": str, optional "reference", ...}); wrong = below the threshold
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from .data.documents import sha256_file
from .errors import UserError

# ---------------------------------------------------------------- tasks

def _split(items: list[dict], heldout: float) -> tuple[list[dict], list[dict]]:
    def h(it):
        key = json.dumps(it["messages"], sort_keys=True)
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
    train = [it for it in items if h(it) >= heldout]
    val = [it for it in items if h(it) < heldout]
    if not val and len(train) > 1:
        val, train = train[-1:], train[:-1]
    return train, val


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path} not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n}: not valid JSON") from None
    return out


def load_task(task: str, paths, data: str | None, heldout: float):
    """(name, train items, held-out items, scorer(reply, item) -> float, default threshold). An item is
    {"messages": prompt messages, "reference": str | None, ...}."""
    from .evidence import held_out, rouge_l

    if task in ("chat", "docstrings"):
        if data:
            items = held_out(Path(data), 1 << 30)
            train, val = _split(items, heldout)
        else:
            for f in ("sft_train.jsonl", "sft_val.jsonl"):
                if not (paths.data / f).is_file():
                    raise UserError(f"{paths.data / f} not found: run `chatforge prepare` (it writes the chat set) "
                                    f"or give --data CHAT.jsonl")
            train, val = held_out(paths.data / "sft_train.jsonl", 1 << 30), held_out(paths.data / "sft_val.jsonl", 1 << 30)
        return "chat (ROUGE-L)", train, val, lambda reply, it: rouge_l(reply, it["reference"]), 0.5
    if task == "gsm8k":
        from .tasks import gsm8k_match, load_items
        if not data:  # the registered gsm8k task is the test split: a benchmark, never training data
            raise UserError("--task gsm8k needs --data FILE: GSM8K-format JSONL of training problems (question, "
                            "answer ending '#### N'), e.g. GSM8K's train split")
        recs = load_items(data, "gsm8k")
        items = [{"messages": [{"role": "user", "content": r["question"]}], "reference": r["answer"],
                  "answer": r["answer"]} for r in recs]
        train, val = _split(items, heldout)

        def score(reply, it):
            strict, flex, _, _ = gsm8k_match(reply, it["answer"])
            return float(strict or flex)
        return "gsm8k (exact match)", train, val, score, 0.5
    if ":" in task and task.split(":")[0].endswith(".py"):
        file, fn_name = task.rsplit(":", 1)
        spec = importlib.util.spec_from_file_location("chatforge_user_task", file)
        if spec is None or not Path(file).is_file():
            raise UserError(f"--task {task}: {file} not found")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fn: Callable = getattr(mod, fn_name, None)
        if not callable(fn):
            raise UserError(f"--task {task}: {file} has no function {fn_name}")
        if not data:
            raise UserError(f"--task {task} needs its items: --data FILE.jsonl with {{\"prompt\": ...}} records")
        items = []
        for r in _read_jsonl(Path(data)):
            if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
                raise UserError(f"{data}: every record needs a string \"prompt\"")
            items.append({**r, "messages": [{"role": "user", "content": r["prompt"]}],
                          "reference": r.get("reference")})
        train, val = _split(items, heldout)

        def user_score(reply, it):
            extra = {k: v for k, v in it.items() if k not in ("messages", "prompt")}
            return float(fn(it["prompt"], reply, **extra))
        return f"{Path(file).name}:{fn_name}", train, val, user_score, 0.5
    raise UserError(f"--task {task!r} is not known; use chat, gsm8k or FILE.py:FUNCTION")


# ---------------------------------------------------------------- scoring

def replies(model, tok, items: list[dict], max_new: int, device, temperature: float = 0.0, seed: int = 0,
            n: int = 1) -> list[list[str]]:
    """n replies per item (greedy when temperature is 0), decoded in batches; prompts too long get []."""
    from .engine import Engine
    eng = Engine(model, tok, device=str(device))
    out: list[list[str]] = [[] for _ in items]
    prompts = []
    for i, it in enumerate(items):
        ids = tok.render_chat(it["messages"], add_generation_prompt=True)[0]
        if len(ids) + 1 < model.cfg.seq_len:
            prompts.append((i, ids))
    for rep in range(n):
        for k in range(0, len(prompts), 16):
            part = prompts[k:k + 16]
            limit = min(max_new, model.cfg.seq_len - max(len(ids) for _, ids in part))
            got = eng.generate([ids for _, ids in part], max_new_tokens=limit, temperature=temperature,
                               seed=seed + rep * 7919 + k, stop_ids=tok.stop_ids)
            for (i, _), g in zip(part, got):
                out[i].append(tok.decode(g))
    return out


def evaluate(model, tok, items, scorer, threshold, max_new, device) -> tuple[dict, list[str]]:
    texts = [r[0] if r else None for r in replies(model, tok, items, max_new, device)]
    scores = [scorer(t, it) if t is not None else 0.0 for t, it in zip(texts, items)]
    n = len(items)
    return {"items": n, "score": sum(scores) / n if n else None,
            "correct": sum(s >= threshold for s in scores) / n if n else None,
            "scores": scores}, texts


# ---------------------------------------------------------------- the loop

def _latest(paths) -> Path:
    from .checkpoint import list_checkpoints, resolve_checkpoint
    for stage in (paths.finetune, paths.pretrain, paths.imported):
        if list_checkpoints(stage / "ckpt"):
            return resolve_checkpoint(stage / "ckpt", "best")
    raise UserError(f"{paths.root} has no model yet: run `chatforge pretrain` (or `import`) first")


def improve(cfg, paths, task: str, rounds: int = 2, *, data: str | None = None, max_items: int = 64,
            heldout_items: int = 32, threshold: float | None = None, samples: int = 0, heldout: float = 0.2,
            force: bool = False) -> dict:
    """The loop (module docstring); returns the summary written to RUN/improve/summary.json."""
    import torch

    from .checkpoint import load_model
    from .distributed import pick_device
    from .finetune import run_finetune
    from .report import print_table
    from .tokenizer import Tokenizer

    if rounds < 1:
        raise UserError(f"--rounds {rounds} must be >= 1")
    out_dir = paths.root / "improve"
    paths.guard(out_dir, force, "an improve run")
    name, train_items, val_items, scorer, default_thr = load_task(task, paths, data, heldout)
    thr = default_thr if threshold is None else threshold
    train_items = train_items[:max_items] if max_items else train_items
    val_items = val_items[:heldout_items] if heldout_items else val_items
    if not train_items or not val_items:
        raise UserError(f"task {name}: {len(train_items)} training and {len(val_items)} held-out items; need both")
    device = pick_device(cfg.finetune.device)
    tok = Tokenizer.load(paths.tokenizer)
    max_new = cfg.generate.max_new_tokens
    print(f"improve: task {name}, {len(train_items)} training items, {len(val_items)} held out, threshold {thr:g}, "
          f"{rounds} round(s)")

    summary = {"task": name, "threshold": thr, "train_items": len(train_items), "heldout_items": len(val_items),
               "rounds": []}
    start = _latest(paths)
    before_val = None
    for k in range(1, rounds + 1):
        rdir = out_dir / f"round_{k}"
        init = rdir / "init"
        init.mkdir(parents=True)  # the starting model survives the fine-tune (RUN/finetune is replaced)
        for f in ("meta.json", "model.safetensors"):
            shutil.copyfile(start / f, init / f)
        model, _ = load_model(init, device=device)
        model.eval()
        with torch.no_grad():
            tr, tr_texts = evaluate(model, tok, train_items, scorer, thr, max_new, device)
            if before_val is None:
                before_val, _ = evaluate(model, tok, val_items, scorer, thr, max_new, device)
            wrong = [i for i, s in enumerate(tr["scores"]) if s < thr]
            sampled = replies(model, tok, [train_items[i] for i in wrong], max_new, device, temperature=1.0,
                              seed=k, n=samples) if samples else [[] for _ in wrong]
        pairs, unpaired = [], 0
        for i, cands in zip(wrong, sampled):
            it, bad = train_items[i], tr_texts[i]
            chosen = it.get("reference")
            if chosen is None:  # the best sampled reply that passes
                good = [(scorer(c, it), c) for c in cands if c.strip()]
                good = [g for g in good if g[0] >= thr]
                chosen = max(good)[1] if good else None
            if not chosen or not bad or chosen.strip() == bad.strip():  # nothing to prefer, or an empty reply
                unpaired += 1
                continue
            pairs.append({"prompt": it["messages"], "chosen": [{"role": "assistant", "content": chosen}],
                          "rejected": [{"role": "assistant", "content": bad}]})
        rdir.mkdir(parents=True, exist_ok=True)
        pairs_file = rdir / "pairs.jsonl"
        pairs_file.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        row = {"round": k, "start": str(start), "init_sha256": sha256_file(init / "model.safetensors"), "train_score": tr["score"], "train_correct": tr["correct"],
               "wrong": len(wrong), "pairs": len(pairs), "unpaired": unpaired,
               "heldout_before": {"score": before_val["score"], "correct": before_val["correct"]}}
        if len(pairs) < 2:
            print(f"improve round {k}: {len(pairs)} preference pair(s) from {len(wrong)} wrong items: stopping")
            row["stopped"] = "too few pairs"
            summary["rounds"].append(row)
            break
        rcfg = copy.deepcopy(cfg)
        rcfg.finetune.mode, rcfg.finetune.inputs, rcfg.finetune.init_from = "dpo", [str(pairs_file)], str(init)
        rcfg.finetune.eval_prompts = 0
        res = run_finetune(rcfg, paths, force=True)
        if res.get("interrupted"):
            raise UserError(f"improve round {k}: DPO was interrupted; run improve again with --force")
        ev = res["eval"]
        start = _latest(paths)
        model, _ = load_model(start, device=device)
        with torch.no_grad():
            after_val, _ = evaluate(model.eval(), tok, val_items, scorer, thr, max_new, device)
        row.update(heldout_after={"score": after_val["score"], "correct": after_val["correct"]},
                   dpo={"pairs_train": ev["data"]["train"], "pairs_val": ev["data"]["val"],
                        "reward_accuracy": [ev["before"].get("reward_accuracy"), ev["after"].get("reward_accuracy")],
                        "reward_margin": [ev["before"].get("reward_margin"), ev["after"].get("reward_margin")]},
                   model=str(start), model_sha256=sha256_file(start / "model.safetensors"))
        shutil.copyfile(paths.finetune / "finetune_eval.json", rdir / "finetune_eval.json")
        summary["rounds"].append(row)
        before_val = after_val  # the next round's starting model is this one
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    rows = [{"round": r["round"], "train wrong": f"{r['wrong']}/{len(train_items)}", "pairs": r["pairs"],
             "held-out score": f"{fmt(r['heldout_before']['score'])} -> "
                               f"{fmt(r.get('heldout_after', {}).get('score'))}",
             "held-out correct": f"{fmt(r['heldout_before']['correct'])} -> "
                                 f"{fmt(r.get('heldout_after', {}).get('correct'))}",
             "reward acc (DPO val)": " -> ".join(fmt(v) for v in r["dpo"]["reward_accuracy"]) if "dpo" in r else "n/a"}
            for r in summary["rounds"]]
    print_table(rows, list(rows[0]) if rows else None, title=f"improve: {name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
