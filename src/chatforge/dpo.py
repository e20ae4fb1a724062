"""Direct Preference Optimisation (finetune.mode=dpo): learn from pairs of a preferred and a dispreferred reply.

Data (finetune.inputs, JSONL or a JSON list), TRL's preference formats:
  standard        {"prompt": str, "chosen": str, "rejected": str}       rendered as a one-turn chat (user: prompt,
                                                                        assistant: the reply), as SFT renders
                                                                        prompt/completion records
  conversational  {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
  implicit prompt {"chosen": [whole conversation], "rejected": [whole conversation]}: the prompt is the longest
                  common prefix of messages (TRL's extract_prompt)
A completion is what rendering prompt + reply adds to rendering the prompt with the generation prompt (TRL's
rule), so it ends with the end-of-turn token, which the model must learn to say. Pairs with an empty reply,
identical replies, or more tokens than the training context are skipped and counted (data_info["skipped"]).

Loss (as TRL 1.16 DPOTrainer._compute_loss, f-divergence reverse KL, no length weighting):
  logratio_c = logp(chosen) - ref_logp(chosen)      (log-probs summed over completion tokens)
  sigmoid:  -logsigmoid(beta * (logratio_c - logratio_r))
  ipo:      (logratio_c / len_c - logratio_r / len_r - 1 / (2 beta))^2        (len: completion tokens)
averaged over pairs. The reference log-probs are computed once, in plan(), with the starting model (with LoRA
that is the base: TRL's "disabled adapters" reference) and stored with each pair. Rewards are
beta * logratio; reward accuracy is the share of pairs whose chosen reward is strictly above the rejected one.

Held-out pairs (by the hash of the prompt, dpo.val_fraction) give the validation loss, reward margin and
accuracy during training, and the before/after evidence.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data.loader import IGNORE, _Stream
from .errors import UserError

LOSSES = ("sigmoid", "ipo")


# ---------------------------------------------------------------- data

class _Skip(Exception):
    """An understood but unusable pair; the message is the reason counted."""


def _read_records(path: Path) -> Iterable[object]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        yield from (data if isinstance(data, list) else [data])
        return
    for line in text.splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield None  # counted as bad_json


def _messages(value, what: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise _Skip("bad_format")
    out = []
    for m in value:
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise _Skip("bad_format")
        out.append({"role": role, "content": content})
    return out


def normalize_pair(rec) -> tuple[str, list[dict], list[dict], list[dict]]:
    """(format, prompt messages, chosen messages, rejected messages) of one record, or _Skip(reason)."""
    if rec is None:
        raise _Skip("bad_json")
    if not isinstance(rec, dict) or "chosen" not in rec or "rejected" not in rec:
        raise _Skip("bad_format")
    chosen, rejected, prompt = rec["chosen"], rec["rejected"], rec.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise _Skip("bad_format")
        fmt, prompt = "standard", [{"role": "user", "content": prompt}]
        chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    elif prompt is None:  # implicit prompt: the longest common prefix of the two conversations
        fmt = "implicit_prompt"
        c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        k = 0
        while k < min(len(c), len(r)) and c[k] == r[k]:
            k += 1
        while k > 0 and c[k - 1]["role"] == "assistant":  # the completions start with the assistant's turn
            k -= 1
        prompt, chosen, rejected = c[:k], c[k:], r[k:]
    else:
        fmt = "conversational"
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if not prompt or not chosen or not rejected:
        raise _Skip("empty")
    for msgs in (chosen, rejected):
        if msgs[0]["role"] != "assistant":
            raise _Skip("bad_format")
        if not any(m["content"] for m in msgs):  # "" only: a reply of blanks is a (bad) reply a model gives
            raise _Skip("empty")
    if chosen == rejected:
        raise _Skip("identical")
    return fmt, prompt, chosen, rejected


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tok, prompt: list[dict], chosen: list[dict], rejected: list[dict]):
    """(prompt_ids, chosen_ids, rejected_ids): the completion starts where the rendered prompt (with the
    generation prompt) and the rendered prompt + completion diverge, as in TRL."""
    p = tok.render_chat(prompt, add_generation_prompt=True)[0]
    pc = tok.render_chat(prompt + chosen)[0]
    pr = tok.render_chat(prompt + rejected)[0]
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    return p[:n], pc[n:], pr[n:]


def prompt_hash(prompt: list[dict]) -> float:
    key = json.dumps([[m["role"], " ".join(m["content"].split())] for m in prompt], ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(("dpo\0" + key).encode("utf-8"), digest_size=8).digest(), "big") / 2**64


def load_pairs(tok, inputs: Sequence[str], seq_len: int) -> tuple[list[dict], dict]:
    """Every usable pair of the files: {"prompt_ids", "chosen_ids", "rejected_ids", "hash"}, and the counts."""
    pairs: list[dict] = []
    skipped: Counter = Counter()
    formats: Counter = Counter()
    files = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix in (".jsonl", ".json"))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"preference data {spec} not found; give JSONL files of prompt/chosen/rejected pairs")
    if not files:
        raise UserError("DPO needs preference pairs: pass --input PAIRS.jsonl (prompt/chosen/rejected records)")
    for f in files:
        usable = 0
        for rec in _read_records(f):
            try:
                fmt, prompt, chosen, rejected = normalize_pair(rec)
                try:
                    p_ids, c_ids, r_ids = tokenize_pair(tok, prompt, chosen, rejected)
                except UserError:
                    raise _Skip("bad_format") from None
                if not c_ids or not r_ids:
                    raise _Skip("empty")
                if c_ids == r_ids:
                    raise _Skip("identical")
                # One row is prompt + completion minus the last token: it must fit the context.
                if len(p_ids) >= seq_len or len(p_ids) + max(len(c_ids), len(r_ids)) - 1 > seq_len:
                    raise _Skip("too_long")
            except _Skip as s:
                skipped[str(s)] += 1
                continue
            formats[fmt] += 1
            usable += 1
            pairs.append({"prompt_ids": p_ids, "chosen_ids": c_ids, "rejected_ids": r_ids,
                          "hash": prompt_hash(prompt)})
        if not usable:
            raise UserError(f"no usable preference pairs in {f} (skipped: {dict(skipped) or 'none'}); each line "
                            f"needs prompt/chosen/rejected (strings or chat messages), non-empty and different")
    return pairs, {"pairs": len(pairs), "skipped": dict(skipped), "formats": dict(formats),
                   "files": [str(f) for f in files]}


def split_pairs(pairs: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """Held out by prompt hash, so a prompt never sits in both; at least one prompt each side when possible."""
    train = [p for p in pairs if p["hash"] >= val_fraction]
    val = [p for p in pairs if p["hash"] < val_fraction]
    hashes = sorted({p["hash"] for p in pairs})
    if val_fraction > 0 and not val and len(hashes) > 1:
        val = [p for p in pairs if p["hash"] == hashes[0]]
        train = [p for p in pairs if p["hash"] != hashes[0]]
    if not train and len(hashes) > 1:
        train = [p for p in pairs if p["hash"] == hashes[-1]]
        val = [p for p in pairs if p["hash"] != hashes[-1]]
    return train, val


# ---------------------------------------------------------------- batches

def collate(pairs: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> 2B rows [chosen..., rejected...] (TRL's order), right-padded to the longest; y is the next
    token on completion positions, IGNORE elsewhere; "ref" (B, 2) the reference log-probs when known."""
    seqs, comp = [], []
    for kind in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            seqs.append(list(p["prompt_ids"]) + list(p[kind]))
            comp.append(len(p[kind]))
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, comp)):
        t = torch.tensor(s, dtype=torch.long)
        x[i, :len(s) - 1] = t[:-1]
        y[i, len(s) - 1 - n:len(s) - 1] = t[len(s) - n:]
    out = {"x": x, "y": y}
    if all("ref" in p for p in pairs):
        out["ref"] = torch.tensor([p["ref"] for p in pairs], dtype=torch.float32)
    return out


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Summed log-prob of each row's target tokens (2B,), computing the head only at the targets."""
    from .evaluate import forward_at_targets
    logits, keep, _ = forward_at_targets(model, batch)
    y = batch["y"]
    if logits.dim() == 3:
        logits, yk = logits[keep], y[keep]
    else:
        yk = y[keep]
    lp = torch.log_softmax(logits.float(), -1).gather(1, yk[:, None]).squeeze(1)
    rows = keep.nonzero()[:, 0]
    return torch.zeros(y.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)


def dpo_terms(logps: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor, beta: float, loss: str):
    """Per-pair loss, chosen and rejected rewards, from row log-probs (2B,) [chosen..., rejected...], the
    reference (B, 2) and completion lengths (2B,)."""
    c, r = logps.chunk(2)
    lc, lr = lengths.chunk(2)
    c_ratio, r_ratio = c - ref[:, 0].to(c.dtype), r - ref[:, 1].to(r.dtype)
    if loss == "sigmoid":
        per = -F.logsigmoid(beta * (c_ratio - r_ratio))
    elif loss == "ipo":
        delta = c_ratio / lc.clamp(min=1) - r_ratio / lr.clamp(min=1)
        per = (delta - 1 / (2 * beta)) ** 2
    else:
        raise UserError(f"finetune.dpo.loss={loss!r} is not known; use one of {', '.join(LOSSES)}")
    return per, beta * c_ratio.detach(), beta * r_ratio.detach()


class DPOLoader:
    """batch_size pairs per batch, in a seeded order per epoch; rank r takes its slice of each global batch.
    Exact resume: the position is (epoch, offset)."""

    def __init__(self, pairs: Sequence[dict], batch_size: int, seq_len: int, *, pad_id: int, rank: int = 0,
                 world: int = 1, seed: int = 0):
        if not pairs:
            raise ValueError("no preference pairs to train on")
        self.pairs, self.batch_size, self.seq_len, self.pad_id = list(pairs), batch_size, seq_len, pad_id
        self.rank, self.world, self.seed = rank, world, seed
        self._stream = _Stream(lambda e: np.random.default_rng([seed, e]).permutation(len(self.pairs)))

    def next_batch(self) -> dict[str, torch.Tensor]:
        B = self.batch_size
        picked = self._stream.take(B * self.world)[self.rank * B:(self.rank + 1) * B]
        return collate([self.pairs[i] for _, i in picked], self.pad_id)

    def state_dict(self) -> dict:
        return {"kind": "dpo", "seed": self.seed, **self._stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._stream.load_state_dict(state)


def iter_pair_batches(pairs: Sequence[dict], batch_size: int, pad_id: int, rank: int = 0, world: int = 1,
                      max_batches: int = 0):
    mine = list(pairs)[rank::world]
    for k, i in enumerate(range(0, len(mine), batch_size)):
        if max_batches and k >= max_batches:
            return
        yield collate(mine[i:i + batch_size], pad_id)


# ---------------------------------------------------------------- the objective

class DPOObjective:
    """train.NextToken's interface: loss summed over pairs, count = pairs."""

    precision = "fp32"  # the loop sets the run's precision (autocast of validate)

    def __init__(self, beta: float, loss: str):
        if loss not in LOSSES:
            raise UserError(f"finetune.dpo.loss={loss!r} is not known; use one of {', '.join(LOSSES)}")
        if beta <= 0:
            raise UserError(f"finetune.dpo.beta={beta} must be > 0")
        self.beta, self.kind = beta, loss
        self._acc = torch.zeros(5, dtype=torch.float64)  # pairs, correct, margin, chosen reward, rejected reward

    def terms(self, model, batch):
        logps = sequence_logps(model, batch)
        lengths = (batch["y"] != IGNORE).sum(1).to(logps.dtype)
        per, cr, rr = dpo_terms(logps, batch["ref"], lengths, self.beta, self.kind)
        return per, cr, rr, logps.detach()

    def loss(self, model, batch: dict) -> torch.Tensor:
        per, cr, rr, _ = self.terms(model, batch)
        self._acc += torch.tensor([len(per), float((cr > rr).sum()), float((cr - rr).sum()), float(cr.sum()),
                                   float(rr.sum())], dtype=torch.float64)
        return per.sum()

    def count(self, batch: dict) -> float:
        return float(batch["x"].shape[0] // 2)

    def measure(self, model, batches, device, precision: str | None = None) -> dict:
        """Sums over every rank's held-out pairs -> mean loss, reward accuracy and margin, log-probs."""
        from .distributed import all_reduce_sum, autocast_ctx
        s = torch.zeros(8, dtype=torch.float64)
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for b in batches:
                    b = {k: v.to(device) for k, v in b.items()}
                    with autocast_ctx(device, precision or self.precision):
                        per, cr, rr, lp = self.terms(model, b)
                    c, r = lp.chunk(2)
                    s += torch.tensor([len(per), float(per.sum()), float((cr > rr).sum()), float((cr - rr).sum()),
                                       float(c.sum()), float(r.sum()), float((c > r).sum()), float(cr.sum())],
                                      dtype=torch.float64)
        finally:
            model.train(was)
        s = all_reduce_sum(s.to(device)).cpu() if torch.device(device).type != "mps" else s
        n = float(s[0])
        if not n:
            return {"pairs": 0}
        return {"pairs": int(n), "dpo_loss": float(s[1]) / n, "reward_accuracy": float(s[2]) / n,
                "reward_margin": float(s[3]) / n, "logp_chosen": float(s[4]) / n, "logp_rejected": float(s[5]) / n,
                "logp_accuracy": float(s[6]) / n, "reward_chosen": float(s[7]) / n}

    def validate(self, model, batches, device) -> tuple[float, dict]:
        m = self.measure(model, batches, device)
        if not m.get("pairs"):
            return float("nan"), {}
        return m["dpo_loss"], {k: m[k] for k in ("reward_accuracy", "reward_margin", "logp_chosen",
                                                 "logp_rejected")}

    def stats(self) -> dict:
        n, correct, margin, cr, rr = self._acc.tolist()
        self._acc.zero_()
        if not n:
            return {}
        return {"reward_accuracy": correct / n, "reward_margin": margin / n, "reward_chosen": cr / n,
                "reward_rejected": rr / n}


def reference_logps(model, pairs: list[dict], pad_id: int, device, batch_size: int = 16,
                    precision: str = "fp32") -> None:
    """Store each pair's reference log-probs ("ref": [chosen, rejected]) under the model as it is now, computed
    in the precision training will use (so that at step 0 the policy's log-probs equal the reference's)."""
    from .distributed import autocast_ctx
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(pairs), batch_size):
                part = pairs[i:i + batch_size]
                b = {k: v.to(device) for k, v in collate(part, pad_id).items()}
                with autocast_ctx(device, precision):
                    lp = sequence_logps(model, b).float().cpu()
                c, r = lp.chunk(2)
                for p, a, z in zip(part, c.tolist(), r.tolist()):
                    p["ref"] = [a, z]
    finally:
        model.train(was)


# ---------------------------------------------------------------- the plan

def plan(cfg, paths, model, tok, dist, seq_len: int, resume: bool):
    """finetune.run_finetune's hook for mode dpo: pairs, reference log-probs, loader, objective, evidence."""
    from .train import Plan

    fcfg, dcfg = cfg.finetune, cfg.finetune.dpo
    objective = DPOObjective(dcfg.beta, dcfg.loss)
    if not fcfg.inputs:
        raise UserError("DPO needs preference pairs: pass --input PAIRS.jsonl (prompt/chosen/rejected records)")
    pairs, info = load_pairs(tok, fcfg.inputs, seq_len)
    if not pairs:
        raise UserError(f"no usable preference pairs in {', '.join(fcfg.inputs)} (skipped: {info['skipped']})")
    train_pairs, val_pairs = split_pairs(pairs, dcfg.val_fraction)
    if not train_pairs:
        raise UserError(f"every preference pair of {', '.join(fcfg.inputs)} was held out; lower "
                        f"finetune.dpo.val_fraction (now {dcfg.val_fraction}) or give more prompts")
    pad = tok.pad_id if tok.pad_id is not None else 0
    model.to(dist.device)
    precision = "fp32"
    try:  # the loop's choice (train.precision), so the reference matches the policy's first forward
        from .machine import choose_precision
        precision = choose_precision(dist.device, getattr(fcfg, "precision", "auto"))[0]
    except (ImportError, AttributeError):
        pass
    reference_logps(model, pairs, pad, dist.device, max(cfg.eval.batch_size, 1), precision)  # the starting model
    loader = DPOLoader(train_pairs, fcfg.batch_size, seq_len, pad_id=pad, rank=dist.rank, world=dist.world,
                       seed=fcfg.seed)
    ebs = max(cfg.eval.batch_size, 1)
    val_batches = (lambda: iter_pair_batches(val_pairs, ebs, pad, dist.rank, dist.world,
                                             fcfg.eval_batches)) if val_pairs else None

    def evidence(m) -> dict:
        out = objective.measure(m, iter_pair_batches(val_pairs, ebs, pad, dist.rank, dist.world), dist.device,
                                precision) if val_pairs else {"pairs": 0}
        return {"heldout_pairs": out.pop("pairs"), **out}

    skipped = info["skipped"]
    info.update(train=len(train_pairs), val=len(val_pairs), beta=dcfg.beta, loss=dcfg.loss,
                reference_precision=precision)
    summary = (f"{len(train_pairs)} preference pairs ({len(val_pairs)} held out; skipped: "
               f"{', '.join(f'{v} {k}' for k, v in sorted(skipped.items())) or 'none'}), {dcfg.loss} loss, "
               f"beta {dcfg.beta:g}")
    return Plan(loader, val_batches, evidence, summary, info, objective=objective)
