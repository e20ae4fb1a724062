"""GRPO: reinforcement learning with verifiable rewards (finetune.mode=grpo), through the one training loop.

Each micro-batch (GroupLoader.next_batch) takes finetune.grpo.prompts_per_step prompts of the task (rewards.py),
samples finetune.grpo.group completions of each from the model that trains (the engine's batched KV-cache
decoding, at grpo.temperature, no top-k/top-p: the samples come from the distribution whose log-probs train),
scores them with the task's reward and normalises the rewards within each group, (r - mean) / (std + 1e-4)
(TRL's scale_rewards="group", Bessel's std). The objective (GRPOObjective) is TRL 1.16 GRPOTrainer's default:
per completion token

    ratio = exp(logp - old_logp)        old_logp = logp detached (one update per batch: on-policy)
    loss  = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * ratio * KL3
    KL3   = exp(ref - logp) - (ref - logp) - 1    (ref: the frozen starting model; beta = 0: no reference)

(the KL term carries the ratio as TRL's use_bias_correction_kl=True does: the same value on-policy, the
unbiased reverse-KL gradient), log-probs at logits / temperature as TRL's, summed over the completion tokens
of the step and divided by their number (loss_type="dapo"): loss() returns the sum, count() the tokens, and the
loop divides by the step's count over all micro-batches and ranks.

Validation and evidence: greedy completions of held-out prompts (disjoint from the training prompts), their
mean reward and exact-match share (the completion, stripped, is the answer). The validation "loss" is minus
the mean reward, so the best checkpoint is the one that scores best.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from . import rewards as R
from .errors import UserError
from .evaluate import IGNORE, forward_at_targets
from .train import Plan

EVAL_BATCH = 64  # held-out prompts decoded together


# ---------------------------------------------------------------- prompts

def encode_item(tok, item: dict) -> list[int]:
    if item.get("plain"):
        return tok.with_bos(tok.encode(R.prompt_text(item)))
    msgs = item.get("messages") or [{"role": "user", "content": R.prompt_text(item)}]
    return list(tok.render_chat(msgs, add_generation_prompt=True)[0])


def encode_items(tok, items: list[dict], seq_len: int) -> tuple[list[tuple[dict, list[int]]], int]:
    """(item, prompt ids) of the items whose prompt leaves room for a completion; and how many did not."""
    out, long = [], 0
    for it in items:
        ids = encode_item(tok, it)
        if len(ids) >= seq_len:
            long += 1
        else:
            out.append((it, ids))
    return out, long


# ---------------------------------------------------------------- rewards

class Scorer:
    """The task's reward on decoded completions. A reward function that raises (or returns no finite number)
    scores 0 for that sample; errors are counted and the first is shown once."""

    def __init__(self, task: R.Task, log=print):
        self.task, self.log, self.errors, self._shown = task, log, 0, False

    def __call__(self, item: dict, completion: str) -> float:
        fields = {k: v for k, v in item.items() if k not in ("prompt", "plain")}
        try:
            r = float(self.task.reward(R.prompt_text(item), completion, **fields))
            if not math.isfinite(r):
                raise ValueError(f"returned {r}")
            return r
        except Exception as e:  # noqa: BLE001 - the user's reward: a bad sample must not stop the run
            self.errors += 1
            if not self._shown:
                self._shown = True
                self.log(f"warning: reward {self.task.name} failed on prompt {R.prompt_text(item)[:80]!r}: "
                         f"{type(e).__name__}: {e}; such samples score 0 (counted as reward_errors)")
            return 0.0


def exact(item: dict, completion: str) -> bool | None:
    if "answer" not in item:
        return None
    return completion.strip() == str(item["answer"]).strip()


def group_advantages(r: torch.Tensor, group: int) -> torch.Tensor:
    """(r - group mean) / (group std + 1e-4), Bessel's std; groups of one get 0 (TRL's nan -> 0)."""
    g = r.view(-1, group)
    std = g.std(dim=1, keepdim=True) if group > 1 else torch.full_like(g[:, :1], float("nan"))
    return torch.nan_to_num((g - g.mean(dim=1, keepdim=True)) / (std + 1e-4), nan=0.0).reshape(-1)


# ---------------------------------------------------------------- batches and log-probs

def make_batch(prompts: list[list[int]], completions: list[list[int]], advantages: torch.Tensor,
               pad_id: int) -> dict:
    """Rows prompt + completion, right-padded: x, y (targets at the completion tokens only, IGNORE elsewhere),
    adv (per row). Right padding needs no mask: a causal model never sees what follows."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    T = max(len(r) for r in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        x[i, :len(r) - 1] = torch.tensor(r[:-1])
        y[i, len(p) - 1:len(r) - 1] = torch.tensor(r[len(p):])
    return {"x": x, "y": y, "adv": advantages.float().reshape(-1)}


def token_logps(model: nn.Module, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (N,) of the target tokens at logits / temperature, row-major, and the target mask (B, T)."""
    logits, keep, _ = forward_at_targets(model, batch)
    if logits.dim() == 3:
        logits = logits[keep]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    y = batch["y"][keep]
    return logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1), keep


class Stats:
    """What the train records show since the last one: reward mean and spread, KL, completion lengths."""

    KEYS = ("n", "r", "r2", "gstd", "groups", "len", "trunc", "kl", "kl_n")

    def __init__(self):
        self.s = dict.fromkeys(self.KEYS, 0.0)
        self.errors = 0

    def add(self, **kv) -> None:
        for k, v in kv.items():
            self.s[k] += float(v)

    def pop(self) -> dict:
        s, n = self.s, self.s["n"]
        out = {}
        if n:
            mean = s["r"] / n
            out.update(reward=mean, reward_std=math.sqrt(max(s["r2"] / n - mean * mean, 0.0)),
                       reward_group_std=s["gstd"] / max(s["groups"], 1), completion_len=s["len"] / n,
                       truncated=s["trunc"] / n)
        if s["kl_n"]:
            out["kl"] = s["kl"] / s["kl_n"]
        out["reward_errors"] = self.errors
        self.s = dict.fromkeys(self.KEYS, 0.0)
        return out

    def state_dict(self) -> dict:
        return {"s": dict(self.s), "errors": self.errors}

    def load_state_dict(self, d: dict) -> None:
        self.s = {k: float(d["s"].get(k, 0.0)) for k in self.KEYS}
        self.errors = int(d["errors"])


class GRPOObjective:
    """The loop's objective: loss() the summed per-token clipped surrogate (+ beta KL), count() the completion
    tokens, so the step's loss is TRL's loss_type="dapo"."""

    def __init__(self, epsilon: float, beta: float, temperature: float, stats: Stats | None = None,
                 evaluate=None):
        self.eps, self.beta, self.temperature = epsilon, beta, temperature
        self.acc = stats or Stats()
        self._evaluate = evaluate

    def per_token(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logp, keep = token_logps(model, batch, self.temperature)
        old = batch["old_logp"][keep] if "old_logp" in batch else logp.detach()
        adv = batch["adv"][:, None].expand_as(keep)[keep].to(logp.dtype)
        ratio = torch.exp(logp - old)
        clipped = torch.clamp(ratio, 1 - self.eps, 1 + self.eps)
        loss = -torch.min(ratio * adv, clipped * adv)
        if self.beta != 0.0:
            d = batch["ref_logp"][keep] - logp
            kl = torch.exp(d) - d - 1
            self.acc.add(kl=float(kl.detach().sum()), kl_n=kl.numel())
            loss = loss + self.beta * kl * ratio
        return loss, keep

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return self.per_token(model, batch)[0].sum()

    def count(self, batch: dict) -> float:
        return float((batch["y"] != IGNORE).sum())

    def validate(self, model: nn.Module, batches, device) -> tuple[float, dict]:
        from .distributed import unwrap
        res = self._evaluate(unwrap(model), list(batches))
        return -res["reward"], {"reward": res["reward"], "exact_match": res["exact_match"]}

    def stats(self) -> dict:
        return self.acc.pop()


# ---------------------------------------------------------------- sampling

def _sample(model: nn.Module, tok, prompts: list[list[int]], max_new: int, seq_len: int, **sampling
            ) -> list[list[int]]:
    """Completions from `model` (eval mode, no grad, eager), its train/eval mode restored after."""
    from .distributed import run_eagerly
    from .engine import Engine

    was = model.training
    dev = next(model.parameters()).device
    try:
        with torch.no_grad(), run_eagerly():
            eng = Engine(model, tok, device=str(dev))
            room = min(max_new, seq_len - max(len(p) for p in prompts))
            return eng.generate(prompts, max_new_tokens=room, stop_ids=tok.stop_ids, **sampling)
    finally:
        model.train(was)


def greedy_eval(model: nn.Module, tok, scorer: Scorer, items: list[tuple[dict, list[int]]], max_new: int,
                seq_len: int, samples: int = 0) -> dict:
    """Greedy completions of held-out items: mean reward, exact-match share (None when the items carry no
    answer), and the first `samples` completions."""
    rs, ex, shown = [], [], []
    for k in range(0, len(items), EVAL_BATCH):
        chunk = items[k:k + EVAL_BATCH]
        outs = _sample(model, tok, [ids for _, ids in chunk], max_new, seq_len, temperature=0.0)
        for (it, _), o in zip(chunk, outs):
            text = tok.decode(o)
            rs.append(scorer(it, text))
            e = exact(it, text)
            if e is not None:
                ex.append(e)
            if len(shown) < samples:
                shown.append({"prompt": R.prompt_text(it), "completion": text, "reward": rs[-1]})
    return {"reward": sum(rs) / len(rs) if rs else None, "exact_match": sum(ex) / len(ex) if ex else None,
            "prompts": len(rs), "samples": shown}


class GroupLoader:
    """next_batch(): prompts_per_step prompts x group sampled completions, scored, as a padded batch. The
    prompts go round the training pool in a seeded order per epoch (each rank its own share of a step's); the
    sampling seed follows the batch count, so a resumed run samples what the uninterrupted one would have."""

    def __init__(self, items: list[tuple[dict, list[int]]], tok, g, scorer: Scorer, stats: Stats, seq_len: int,
                 seed: int, rank: int = 0, world: int = 1, ref: nn.Module | None = None):
        self.items, self.tok, self.g, self.scorer, self.acc = items, tok, g, scorer, stats
        self.seq_len, self.seed, self.rank, self.world, self.ref = seq_len, seed, rank, world, ref
        self.model: nn.Module | None = None
        self.epoch = self.pos = self.batches = 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def bind(self, model: nn.Module) -> None:
        self.model = model
        if self.ref is not None:
            self.ref.to(next(model.parameters()).device)

    def _take(self) -> list[tuple[dict, list[int]]]:
        want = self.g.prompts_per_step * self.world
        got = []
        while len(got) < want:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            got.append(self.items[int(self._order[self.pos])])
            self.pos += 1
        k = self.g.prompts_per_step
        return got[self.rank * k:(self.rank + 1) * k]

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.model is None:
            raise RuntimeError("GroupLoader.bind(model) must be called before training")
        g = self.g
        chosen = self._take()
        prompts = [ids for _, ids in chosen for _ in range(g.group)]
        seed = (self.seed * 1_000_003 + self.batches * 9973 + self.rank) % (2**62)
        self.batches += 1
        outs = _sample(self.model, self.tok, prompts, g.max_new_tokens, self.seq_len, temperature=g.temperature,
                       top_k=0, top_p=1.0, seed=seed)
        before = self.scorer.errors
        r = torch.tensor([self.scorer(it, self.tok.decode(o)) for k, (it, _) in enumerate(chosen)
                          for o in outs[k * g.group:(k + 1) * g.group]], dtype=torch.float64)
        self.acc.errors += self.scorer.errors - before
        adv = group_advantages(r, g.group)
        stops = set(self.tok.stop_ids)
        lens = torch.tensor([len(o) for o in outs], dtype=torch.float64)
        grp_std = r.view(-1, g.group).std(dim=1) if g.group > 1 else torch.zeros(len(chosen), dtype=torch.float64)
        self.acc.add(n=len(r), r=r.sum(), r2=(r * r).sum(), gstd=grp_std.sum(), groups=len(chosen),
                     len=lens.sum(), trunc=sum(1 for o in outs if not o or o[-1] not in stops))
        batch = make_batch(prompts, outs, adv, self.tok.pad_id)
        if self.ref is not None:
            dev = next(self.ref.parameters()).device
            with torch.no_grad():
                b = {k: v.to(dev) for k, v in batch.items()}
                logp, keep = token_logps(self.ref, b, g.temperature)
                ref = torch.zeros(keep.shape, dtype=torch.float32, device=dev)
                ref[keep] = logp.float()
            batch["ref_logp"] = ref.cpu()
        return batch

    def state_dict(self) -> dict:
        return {"kind": "grpo", "seed": self.seed, "epoch": self.epoch, "pos": self.pos, "batches": self.batches,
                "scorer_errors": self.scorer.errors, "stats": self.acc.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self.batches = int(state["epoch"]), int(state["pos"]), int(state["batches"])
        self.scorer.errors = int(state.get("scorer_errors", 0))
        self.acc.load_state_dict(state["stats"])
        self._order = self._perm(self.epoch)


# ---------------------------------------------------------------- the mode's plan

def check_settings(g) -> None:
    bad = [f"{k}={getattr(g, k)} (must be {rule})" for k, ok, rule in (
        ("group", g.group >= 1, ">= 1"), ("prompts_per_step", g.prompts_per_step >= 1, ">= 1"),
        ("max_new_tokens", g.max_new_tokens >= 1, ">= 1"), ("temperature", g.temperature > 0, "> 0"),
        ("epsilon", g.epsilon >= 0, ">= 0"), ("beta", g.beta >= 0, ">= 0"),
        ("eval_prompts", g.eval_prompts >= 0, ">= 0")) if not ok]
    if bad:
        raise UserError("finetune.grpo: " + "; ".join(bad))


def plan(cfg, paths, model: nn.Module, tok, dist, seq_len: int, resume: bool) -> Plan:
    """finetune.mode=grpo: the task's prompts, the sampling loader, the GRPO objective, held-out evidence."""
    g, fcfg = cfg.finetune.grpo, cfg.finetune
    check_settings(g)
    log = print if dist.is_main else (lambda *_: None)
    task = R.get_task(g.task, g.prompts)
    train_items, eval_items = R.split(task.items, g.eval_prompts)
    train_enc, long_train = encode_items(tok, train_items, seq_len)
    eval_enc, long_eval = encode_items(tok, eval_items, seq_len)
    if not train_enc:
        raise UserError(f"finetune.grpo: task {task.name} left no training prompts ({len(task.items)} items, "
                        f"{len(eval_items)} held out, {long_train} longer than the context of {seq_len}); give more "
                        f"prompts or lower finetune.grpo.eval_prompts")
    if long_train + long_eval:
        log(f"note: {long_train + long_eval} prompts do not fit the context of {seq_len} tokens: skipped")
    stats = Stats()
    scorer = Scorer(task, log)
    ref = None
    if g.beta > 0:  # the reference: a frozen copy of the starting model
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    loader = GroupLoader(train_enc, tok, g, scorer, stats, seq_len, fcfg.seed, dist.rank, dist.world, ref)

    def evaluate(m: nn.Module, items: list, samples: int = 0) -> dict:
        return greedy_eval(m, tok, scorer, items, g.max_new_tokens, seq_len, samples)

    objective = GRPOObjective(g.epsilon, g.beta, g.temperature, stats, evaluate)

    def evidence(m: nn.Module) -> dict:
        if not eval_enc:
            return {"reward": None, "exact_match": None, "prompts": 0}
        res = evaluate(m, eval_enc, samples=5)
        return {"reward": res["reward"], "exact_match": res["exact_match"], "prompts": res["prompts"],
                "reward_errors": scorer.errors, "samples": res["samples"]}

    data_info = {"task": task.name, "prompts_file": g.prompts or None, "items": len(task.items),
                 "train_prompts": len(train_enc), "held_out_prompts": len(eval_enc),
                 "too_long": {"train": long_train, "held_out": long_eval}, "skipped_lines": task.skipped_lines,
                 "group": g.group, "prompts_per_step": g.prompts_per_step, "temperature": g.temperature,
                 "epsilon": g.epsilon, "beta": g.beta, "max_new_tokens": g.max_new_tokens,
                 "loss_type": "dapo (TRL 1.16 GRPOTrainer default)"}
    summary = (f"GRPO on task {task.name}: {len(train_enc)} training prompts, {len(eval_enc)} held out; "
               f"{g.prompts_per_step} prompts x {g.group} samples per micro-batch, temperature {g.temperature:g}, "
               f"epsilon {g.epsilon:g}, beta {g.beta:g}")
    return Plan(loader, (lambda: eval_enc) if eval_enc else None, evidence, summary, data_info,
                objective=objective, bind=loader.bind)


__all__: list[Any] = [
    "GRPOObjective",
    "GroupLoader",
    "Scorer",
    "greedy_eval",
    "group_advantages",
    "make_batch",
    "plan",
    "token_logps",
]
