"""`chatforge demo`: every stage from scratch on the run's data, then the same chat fine-tuning of a real
pre-trained model, compared on the same held-out questions; and `chatforge report`."""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

from . import stages
from .config import Config
from .errors import UserError
from .paths import RunPaths
from .use import CHAT_MODEL, METRIC_COLUMNS, evaluate_splits, load_run_model, metric_rows

ANSWERS_SHOWN = 5  # held-out questions whose replies the demo prints and the report lists


def report(cfg: Config, paths: RunPaths, evals: list[dict] | None = None, answers: list[dict] | None = None,
           comparison: dict | None = None) -> Path:
    from .report import plot_loss_curves, write_report

    curves = {s: getattr(paths, s) / "metrics.jsonl" for s in ("pretrain", "finetune")
              if (getattr(paths, s) / "metrics.jsonl").exists()}
    if curves:
        plot_loss_curves(curves, paths.root / "loss.png", title=f"{cfg.name}: loss")

    def saved(name: str, default):
        p = paths.root / "eval" / name
        return json.loads(p.read_text()) if p.is_file() else default

    written = []  # every row `chatforge eval` wrote for this run: validation splits, --file, --task benchmarks
    for f in sorted((paths.root / "eval").glob("*.json")) if (paths.root / "eval").exists() else []:
        if f.name not in ("demo.json", "answers.json", "comparison.json"):
            rows = json.loads(f.read_text())
            written += [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    if evals is None:  # the demo's table, then the validation rows of `chatforge eval`
        evals = saved("demo.json", []) + [r for r in written if "split" in r and "task" not in r]
    answers = saved("answers.json", []) if answers is None else answers
    comparison = saved("comparison.json", None) if comparison is None else comparison
    notes = []
    fe = paths.finetune / "finetune_eval.json"
    if fe.exists():
        e = json.loads(fe.read_text())
        b, a = e.get("before", {}), e.get("after", {})

        def share(key: str) -> str | None:  # None: not measured (e.g. finetune.eval_sampled=false)
            if b.get(key) is None or a.get(key) is None:
                return None
            return f"{b[key]:.0%} before, {a[key]:.0%} after"

        greedy, sampled = share("end_of_turn_share_greedy"), share("end_of_turn_share")
        if greedy or sampled:
            notes.append(f"fine-tuning ({e.get('mode')}{', LoRA' if e.get('lora') else ''}): replies to "
                         f"{a.get('prompts')} held-out prompts that end with end-of-turn within "
                         f"{e.get('max_new_tokens')} tokens: "
                         + "; ".join(f"{how}: {v}" for how, v in (("greedy", greedy),
                                                                  ("sampled with the generate settings", sampled)) if v))
    samples = []
    for stage, mpath in curves.items():  # the fixed-prompt samples of each stage's last evaluation
        recs = [json.loads(l) for l in mpath.read_text().splitlines() if '"sample"' in l]
        last = max((r["step"] for r in recs), default=None)
        samples += [{**r, "prompt": f"{stage} step {r['step']}: {r['prompt']}"} for r in recs if r["step"] == last]
    tok_stats = paths.tokenizer / "stats.json"
    benchmarks = [{k: v for k, v in r.items() if k not in ("predictions", "samples")} for r in written if "task" in r]
    sections = {"comparison": comparison, "config": cfg.to_dict(), "evals": evals, "benchmarks": benchmarks,
                "answers": answers or [], "notes": notes, "plots": ["loss.png"] if curves else [],
                "samples": [{k: v for k, v in x.items() if k != "step"} for x in samples],
                "tokenizer": json.loads(tok_stats.read_text()) if tok_stats.exists() else None}
    return write_report(paths.root, sections)


def _answers(paths: RunPaths) -> list[dict]:
    """A few of the fine-tuned model's greedy replies to held-out questions (finetune's evidence, not decoded again)."""
    ev = json.loads((paths.finetune / "finetune_eval.json").read_text())
    replies = ev["after"].get("replies") or []
    pick = [replies[i * len(replies) // ANSWERS_SHOWN] for i in range(ANSWERS_SHOWN)] \
        if len(replies) > ANSWERS_SHOWN else replies
    return [{"question": r["prompt"], "answer": r["reply_greedy"], "reference": r.get("reference"),
             "ended_with_end_of_turn": r["greedy_ended_with_end_of_turn"]} for r in pick]


def _stop_if_interrupted(result, name: str, root: Path) -> None:
    if isinstance(result, dict) and result.get("interrupted"):
        raise UserError(f"{name} was interrupted (its checkpoint is saved); continue with "
                        f"`chatforge {name} {root} --resume`, then the later stages")


def demo(cfg: Config, paths: RunPaths, force: bool = False) -> Path:
    """Every stage from scratch on the run's data, then (cfg.demo.pretrained) the same chat fine-tuning of a real
    pre-trained model in RUN/pretrained; chat/serve/export of RUN use whichever answers held-out questions better."""
    from .hub import KNOWN
    from .report import print_table
    from .tokenizer import Tokenizer

    src = cfg.demo.pretrained
    if src and src not in KNOWN and not Path(src).exists():  # before minutes of from-scratch training
        raise UserError(f"demo.pretrained={src!r}: no such file or folder; give a .gguf file, a Hugging Face "
                        f"folder, one of {', '.join(KNOWN)}, or \"\" for the from-scratch model alone")
    if paths.root.exists() and any(paths.root.iterdir()):
        if not force:
            raise UserError(f"run directory {paths.root} already exists; pass --force to overwrite it "
                            f"(or choose another --run-dir)")
        shutil.rmtree(paths.root)
    t0 = time.time()
    n = 9 if src else 7
    times: dict[str, float] = {}

    def step(i: int, name: str, fn, title: str = ""):
        print(f"\n== [{i}/{n}] {title or name}")
        t = time.time()
        result = fn()
        times[name] = time.time() - t
        _stop_if_interrupted(result, name.split()[0], paths.root)
        return result

    step(1, "prepare", lambda: stages.prepare(cfg, paths))
    step(2, "tokenizer", lambda: stages.tokenizer(cfg, paths))
    step(3, "encode", lambda: stages.encode(cfg, paths))
    step(4, "pretrain", lambda: stages.pretrain(cfg, paths))
    tok = Tokenizer.load(paths.tokenizer)
    rows = step(5, "eval (base model)", lambda: metric_rows(
        "base", evaluate_splits(load_run_model(paths, "pretrain", "best")[0], tok, paths, cfg)))
    step(6, "finetune", lambda: stages.finetune(cfg, paths))
    rows += step(7, "eval (fine-tuned)", lambda: metric_rows(
        "fine-tuned", evaluate_splits(load_run_model(paths, "finetune", "best")[0], tok, paths, cfg)))
    print_table(rows, METRIC_COLUMNS, title="validation")
    (paths.root / "eval").mkdir(exist_ok=True)
    (paths.root / "eval" / "demo.json").write_text(json.dumps(rows, indent=2, default=float))
    answers = _answers(paths)
    (paths.root / "eval" / "answers.json").write_text(json.dumps(answers, indent=2))
    for a in answers:
        print(f"\nQ: {a['question']}\nA: {a['answer']}")
    comparison = None
    if src:
        pre = step(8, "pretrained: import + finetune", lambda: _demo_pretrained(cfg, paths),
                   title=f"a pre-trained model ({src}): import, fine-tune on the same chats")
        print(f"\n== [9/{n}] compare on the same held-out questions")
        if pre is not None:
            label = Path(src).stem if src.endswith(".gguf") else Path(src).name
            comparison = compare_chat_models(paths, {"from scratch": paths, label: pre})
    rep = report(cfg, paths, rows, answers, comparison=comparison)
    (paths.root / "eval" / "demo_times.json").write_text(json.dumps(times, indent=2))
    split = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    print(f"\ndemo finished in {time.time() - t0:.0f} s ({split}). Report: {rep}\n"
          f"chat with it:  chatforge chat {paths.root}")
    return rep


def _demo_pretrained(cfg: Config, paths: RunPaths) -> RunPaths | None:
    """Import cfg.demo.pretrained into RUN/pretrained and fine-tune it on RUN's chat set with cfg.demo.finetune;
    None when a named model cannot be downloaded (one line says so; the demo goes on without it)."""
    from .data.shards import encode_documents
    from .hub import KNOWN
    from .tokenizer import Tokenizer

    sub = RunPaths(paths.root / "pretrained")
    scfg = copy.deepcopy(cfg)
    scfg.name, scfg.finetune = f"{cfg.name}-pretrained", copy.deepcopy(cfg.demo.finetune)
    scfg.eval.max_batches = cfg.demo.eval_batches
    try:
        stages.import_model(scfg, sub, cfg.demo.pretrained)
    except UserError as e:
        if cfg.demo.pretrained in KNOWN and "could not download" in str(e):
            print(f"demo: {cfg.demo.pretrained} could not be downloaded (no network?); the demo goes on with the "
                  f"from-scratch model alone")
            shutil.rmtree(sub.root, ignore_errors=True)
            return None
        raise
    sub.data.mkdir(parents=True, exist_ok=True)
    for f in ("sft_train.jsonl", "sft_val.jsonl", "sft_manifest.json"):  # the same chats, the same split
        if (paths.data / f).is_file():
            shutil.copyfile(paths.data / f, sub.data / f)
    # Forgetting: the run's validation text in this model's tokens (its general-text loss before and after).
    encode_documents(Tokenizer.load(sub.tokenizer), paths.data, sub.tokens, cfg.data.workers, splits=("val",))
    _stop_if_interrupted(stages.finetune(scfg, sub), "finetune", sub.root)
    return sub


def compare_chat_models(paths: RunPaths, runs: dict[str, RunPaths]) -> dict:
    """Held-out answers of each run's fine-tuned model (from its finetune_eval.json), side by side; the one
    with the higher ROUGE-L becomes the run's chat model (RUN/chat_model.json)."""
    from .report import print_table

    evs = {label: json.loads((p.finetune / "finetune_eval.json").read_text()) for label, p in runs.items()}
    rows = []
    for label, ev in evs.items():
        a, b = ev["after"], ev["before"]
        rows.append({"model": label, "ROUGE-L before": b.get("rouge_l"), "ROUGE-L after": a.get("rouge_l"),
                     "end-of-turn before": b.get("end_of_turn_share_greedy"),
                     "end-of-turn after": a.get("end_of_turn_share_greedy"),
                     "general loss before": b.get("general_val_loss"), "general loss after": a.get("general_val_loss"),
                     "questions": a.get("prompts")})
    best = max(rows, key=lambda r: r["ROUGE-L after"] or 0.0)["model"]
    sub = runs[best].root.relative_to(paths.root).as_posix() if runs[best].root != paths.root else ""
    (paths.root / CHAT_MODEL).write_text(json.dumps({"run": sub, "model": best, "by": "ROUGE-L F1 of greedy replies "
                                                     "to the held-out questions", "scores": rows}, indent=2))
    answers: dict[str, dict] = {}
    for label, ev in evs.items():
        for r in ev["after"].get("replies", []):
            q = answers.setdefault(r["prompt"], {"question": r["prompt"], "reference": r.get("reference")})
            q[label] = r["reply_greedy"]
    print_table(rows, list(rows[0]), title="fine-tuned models on the same held-out questions")
    print(f"chat/serve/export of {paths.root} use: {best}")
    out = {"rows": rows, "best": best, "answers": list(answers.values()), "models": list(runs)}
    (paths.root / "eval").mkdir(exist_ok=True)
    (paths.root / "eval" / "comparison.json").write_text(json.dumps(out, indent=2, default=float))
    return out
