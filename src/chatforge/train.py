"""THE training loop, shared by pretraining and fine-tuning.

One optimizer step = cfg.grad_accum micro-batches. The loss of every micro-batch is a *sum* of token losses
divided by the number of target tokens in the whole step (all micro-batches, all ranks), so the gradient is
the same whether a step is 1x8 or 8x1 micro-batches, on one process or several. Everything that decides the
next loss (weights, optimizer, schedule, loader position, RNG, the logging accumulators) is in a checkpoint,
so a resumed run logs bit-identical losses to an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint as ckpt
from . import machine
from .config import TrainConfig
from .distributed import (DistInfo, all_reduce_sum, autocast_ctx, is_fsdp, parallelize, pick_device, run_eagerly,
                          unparallelize, unwrap)
from .errors import UserError
from .evaluate import IGNORE, EmptyEvalError, evaluate_lm, forward_at_targets
from .optim import build_optimizer, build_scheduler

# Peak dense bf16 FLOP/s per device, for MFU. Estimates: MFU is a yardstick, not a measurement.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "4090": 165e12, "L4": 121e12,
              "A10": 125e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
MPS_PEAK_FLOPS = 10e12  # rough Apple-silicon estimate


def train_flops_per_token(model: nn.Module, seq_len: int | None = None) -> float:
    """Model FLOPs of one training token, for MFU: 6 per parameter of a trained matrix (forward, input and
    weight gradients) but 4 per parameter of a frozen one (no weight gradient: LoRA's base), plus attention
    over the seq_len trained on."""
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", True)
    frozen = sum(p.numel() for n, p in model.named_parameters()
                 if not p.requires_grad and p.dim() >= 2 and (tied or "embed_tokens" not in n))
    return model.flops_per_token(seq_len) - 2 * frozen


def peak_flops(device: torch.device, precision: str = "fp32") -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name:
                return flops
        return 100e12
    if device.type == "mps":
        return MPS_PEAK_FLOPS
    return machine.cpu_peak_flops("bfloat16" if precision == "bf16" else "float32")


def cpu_peak_flops() -> float:
    return machine.cpu_peak_flops("float32")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits (N, V) against y (N,). The forward keeps softmax - one_hot, the gradient,
    so the backward is one multiply (F.cross_entropy's goes through log-softmax's backward: on a 49k
    vocabulary about a third slower on CPU). Same loss; gradients equal to float rounding."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, -1, keepdim=True)
        loss = (lse.squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)).sum()
        grad = (logits - lse).exp_()
        grad[torch.arange(len(y), device=y.device), y] -= 1
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad.mul_(g), None  # the graph is used once (no retain_graph in training)


def loss_sum(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens (!= -100), and how many there are."""
    logits, keep, n = forward_at_targets(model, batch)
    if logits.dim() == 2:  # the head and the loss only where there are targets (the same sum)
        return _SoftmaxCrossEntropy.apply(logits.float(), batch["y"][keep]), n
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch["y"].reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, n


def val_loss(model: nn.Module, batches: Iterable[dict], device: torch.device, precision: str = "fp32") -> float:
    """Mean loss per target token over the batches of every rank (evaluate_lm's); NaN when there are none."""
    try:
        return evaluate_lm(model, batches, device=device, accuracy=False, precision=precision)["loss"]
    except EmptyEvalError:
        return float("nan")


class NextToken:
    """What the loop minimises, pluggable: this default is next-token cross-entropy per target token
    (pretraining, chat SFT, continued pretraining). dpo.py and grpo.py give others with the same four methods:
    loss(model, batch) -> summed over units; count(batch) -> units (the step's mean is over all ranks' units);
    validate(model, batches, device) -> (mean loss, extra metrics); stats() -> metrics since the last call."""

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return loss_sum(model, batch)[0]

    def count(self, batch: dict) -> float:
        return float((batch["y"] != IGNORE).sum())

    precision = "fp32"  # set by the loop to the run's precision

    def validate(self, model: nn.Module, batches: Iterable[dict], device: torch.device) -> tuple[float, dict]:
        return val_loss(model, batches, device, self.precision), {}

    def stats(self) -> dict:
        return {}


@dataclasses.dataclass
class Plan:
    """A fine-tuning mode's part (finetune.py: sft, cpt; dpo.py; grpo.py): the training batches, in-training
    validation, before/after evidence, and the objective the loop minimises (None: NextToken). bind(model) is
    called with the model that trains (LoRA-wrapped when LoRA is on) before training, for modes that sample
    from it."""
    loader: Any
    val_batches: Callable[[], Iterable[dict]] | None
    evidence: Callable[[Any], dict]  # model -> {metric: value, ...}, measured before and after
    summary: str  # one line: what it trains on
    data_info: dict
    objective: Any = None
    bind: Callable[[nn.Module], None] | None = None


@dataclasses.dataclass
class LoopState:
    """Everything the loop carries from step to step; saved in every checkpoint so a resume continues exactly."""
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    skipped: int = 0  # steps whose loss was NaN/Inf
    bad_in_row: int = 0
    log_loss_sum: float = 0.0  # since the last train record
    precision: str = ""  # "fp32" | "bf16", decided once per run (a resume keeps it: bit-exact continuation)
    log_loss_n: int = 0
    log_tokens: int = 0
    log_seconds: float = 0.0
    train_loss: float | None = None  # of the last train record
    best_val: float | None = None
    final_val: float | None = None
    val_hist: list = dataclasses.field(default_factory=list)  # the last 3 evaluations, for the overfitting note
    train_hist: list = dataclasses.field(default_factory=list)
    evals_since_best: int = 0
    early_stopped: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> LoopState:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def record_val(self, v: float) -> None:
        self.final_val = v
        if self.best_val is None or v < self.best_val:
            self.best_val, self.evals_since_best = v, 0
        else:
            self.evals_since_best += 1
        self.val_hist = (self.val_hist + [v])[-3:]
        self.train_hist = (self.train_hist + [self.train_loss])[-3:]

    def overfitting(self) -> bool:
        """Validation loss rose for 2 evaluations while training loss fell."""
        vh, th = self.val_hist, self.train_hist
        return len(vh) == 3 and None not in th and vh[0] < vh[1] < vh[2] and th[0] > th[1] > th[2]


# Tests stop a run at a known step with this (a SIGTERM sent to itself during that step), not with timing.
SIGNAL_AT_STEP = int(os.environ.get("CHATFORGE_SIGNAL_AT_STEP", "0") or 0)


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and returns."""

    def __init__(self):
        self.set = False
        self.signum: int | None = None  # which signal stopped the run (its exit status is 128 + signum)
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.set, self.signum = True, signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def resolve_grad_accum(cfg: TrainConfig, seq_len: int, world: int) -> int:
    """Micro-batches per step: cfg.grad_accum, or derived from cfg.global_batch_tokens when that is set."""
    if cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.steps < 0 or cfg.global_batch_tokens < 0:
        raise UserError("train.batch_size and train.grad_accum must be >= 1, train.steps and "
                        "train.global_batch_tokens >= 0")
    if not cfg.global_batch_tokens:
        return cfg.grad_accum
    per_micro = cfg.batch_size * seq_len * world
    if cfg.global_batch_tokens % per_micro:
        lo = max(cfg.global_batch_tokens // per_micro, 1) * per_micro
        raise UserError(f"train.global_batch_tokens={cfg.global_batch_tokens} is not a multiple of batch_size x "
                        f"seq_len x processes = {cfg.batch_size} x {seq_len} x {world} = {per_micro}; use "
                        f"{lo} or {lo + per_micro}, or change train.batch_size / the number of processes")
    return cfg.global_batch_tokens // per_micro


def _check_vocab(loader, vocab_size: int) -> None:
    """Token ids the embedding can't hold crash deep inside it (a device assert on CUDA): say so up front."""
    data_vocab = getattr(loader, "vocab_size", None)
    if data_vocab and data_vocab > vocab_size:
        raise UserError(f"the token shards in {getattr(loader, 'source', 'the training data')} use a vocabulary "
                        f"of {data_vocab} but model.vocab_size is {vocab_size}; set model.vocab_size=0 (taken "
                        f"from the tokenizer) or >= {data_vocab}")


class _Trackers:
    """Optional TensorBoard and W&B mirrors of metrics.jsonl; each is skipped (with one note) if not installed."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, meta: dict, enabled: bool, log: Callable[[str], None]):
        self.tb = self.wandb = None
        if not enabled:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                log("note: train.tensorboard is on but the tensorboard package is not installed; "
                    "pip install tensorboard (logging to metrics.jsonl only)")
        if cfg.wandb_project:
            try:
                import wandb
                self.wandb = wandb.init(project=cfg.wandb_project, dir=str(out_dir), config=meta,
                                        name=out_dir.parent.name + "/" + out_dir.name)
            except ImportError:
                log("note: train.wandb_project is set but wandb is not installed; pip install wandb "
                    "(logging to metrics.jsonl only)")

    def record(self, rec: dict) -> None:
        scalars = {f"{rec['kind']}/{k}": v for k, v in rec.items()
                   if k not in ("kind", "step") and isinstance(v, (int, float)) and v is not None}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, rec["step"])
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop records the interrupted run wrote after the checkpoint it resumes from, and a torn
    line (power loss or a full disk mid-write). The file is replaced atomically: a crash here loses nothing."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in keep))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def train(model: nn.Module, cfg: TrainConfig, train_loader, out_dir: Path, *,
          val_batches: Callable[[], Iterable[dict]] | None, meta: dict, resume: bool = False,
          dist: DistInfo | None = None, log: Callable[[str], None] = print, strategy: str | None = None,
          on_eval: Callable[[nn.Module, int], list[dict]] | None = None, objective=None) -> dict:
    """Train for cfg.steps optimizer steps; metrics to out_dir/metrics.jsonl, checkpoints to out_dir/ckpt.

    on_eval(model, step) -> [{"prompt", "text"}, ...]: called (main process, eval mode, no grad) after each
    evaluation when cfg.sample_every_eval; its records go to metrics.jsonl as kind "sample". It runs under a
    forked RNG, so sampling never changes the training run. cfg.early_stop_patience > 0 stops after that many
    evaluations without a better validation loss, saving a checkpoint at every improvement (kept as best).
    The model is parallelized for the run (distributed.parallelize) and given back plain (FSDP2 stays sharded).

    Returns {step, train_loss, best_val_loss, final_val_loss, tokens, seconds, skipped_steps, interrupted,
    early_stopped, signal}.
    """
    out_dir = Path(out_dir)
    dist = dist or DistInfo(device=pick_device(cfg.device))
    raw = unwrap(model)
    meta = {**meta}
    meta.setdefault("model", dataclasses.asdict(raw.cfg))
    meta.setdefault("train", dataclasses.asdict(cfg))
    _check_vocab(train_loader, raw.cfg.vocab_size)
    resume_dir = _resume_dir(out_dir / "ckpt", meta) if resume else None

    seed_everything(cfg.seed)
    raw.to(dist.device)
    raw.train()
    wrapped = parallelize(raw, cfg, dist, strategy)
    try:
        return _run(raw, wrapped, cfg, train_loader, out_dir, val_batches, meta, resume_dir, dist, log, on_eval,
                    objective or NextToken())
    finally:
        unparallelize(raw)


def _resume_dir(ckpt_root: Path, meta: dict) -> Path:
    """The checkpoint to resume from, after checking it was made with this model config and tokenizer."""
    if not ckpt.list_checkpoints(ckpt_root):
        raise UserError(f"resume requested but {ckpt_root} has no checkpoint; run without --resume")
    resume_dir = ckpt.resolve_checkpoint(ckpt_root, "last")
    saved = ckpt.read_meta(resume_dir)
    if saved.get("model") != meta["model"]:
        changed = sorted(k for k in set(saved.get("model") or {}) | set(meta["model"])
                         if (saved.get("model") or {}).get(k) != meta["model"].get(k))
        raise UserError(f"{resume_dir}/meta.json: the checkpoint's model config differs from this run's "
                        f"(changed: {', '.join(changed)}); resume with the same model config or start a new run")
    if saved.get("tokenizer_hash") and meta.get("tokenizer_hash") and \
            saved["tokenizer_hash"] != meta["tokenizer_hash"]:
        raise UserError(f"{resume_dir}/meta.json: the checkpoint was trained with tokenizer "
                        f"{saved['tokenizer_hash']}, this run's is {meta['tokenizer_hash']}; resume with the "
                        f"tokenizer it was trained with or start a new run")
    return resume_dir


def _run(raw: nn.Module, wrapped: nn.Module, cfg: TrainConfig, train_loader, out_dir: Path,
         val_batches: Callable[[], Iterable[dict]] | None, meta: dict, resume_dir: Path | None, dist: DistInfo,
         log: Callable[[str], None], on_eval: Callable[[nn.Module, int], list[dict]] | None, objective) -> dict:
    """The loop of train(): `wrapped` is what parallelize returned for `raw`."""
    device, is_main = dist.device, dist.is_main
    ckpt_root = out_dir / "ckpt"
    metrics_path = out_dir / "metrics.jsonl"
    seq_len = int(getattr(train_loader, "seq_len", raw.cfg.seq_len))
    accum = resolve_grad_accum(cfg, seq_len, dist.world)
    optimizer = build_optimizer(wrapped, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    flops_tok = train_flops_per_token(raw, seq_len) if hasattr(raw, "flops_per_token") else 0.0

    st = LoopState()
    if resume_dir is not None:
        st = LoopState.from_dict(ckpt.load_training_state(resume_dir, wrapped, optimizer, scheduler, train_loader))
        log(f"resumed from {resume_dir} at step {st.step}")
    if st.precision:
        precision, why = st.precision, f"{st.precision} (as the run being resumed)"
    else:
        precision, why = machine.choose_precision(device, getattr(cfg, "precision", "auto"), raw.cfg.n_embd)
    st.precision = objective.precision = meta["precision"] = precision  # meta: in every checkpoint's meta.json
    if is_main:
        log(f"precision: {why}")
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_dir is not None:
            _trim_metrics(metrics_path, st.step)
        elif metrics_path.exists():
            metrics_path.unlink()  # a fresh run starts a fresh log

    trackers = _Trackers(cfg, out_dir, meta, is_main, log)

    def write(rec: dict) -> None:
        if is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            trackers.record(rec)

    peak = peak_flops(device, precision) * dist.world
    params = [p for p in raw.parameters() if p.requires_grad]

    def run_eval() -> float | None:
        if val_batches is None:
            return None
        v, extra = objective.validate(wrapped, val_batches(), device)
        st.record_val(v)
        tl = st.train_loss
        write({"kind": "val", "step": st.step, "val_loss": v, "train_loss": tl,
               "gap": v - tl if tl is not None else None, **extra})
        samples(st.step)
        if st.overfitting():
            vh = st.val_hist
            log(f"warning: validation loss rose for 2 evaluations ({vh[0]:.4f} -> {vh[2]:.4f}) while training "
                f"loss fell: the model is overfitting; use more data, fewer steps or dropout")
        return v

    def samples(step: int) -> None:
        """Fixed-prompt samples. FSDP shards live on every rank, so one rank can't generate alone: skipped."""
        if on_eval is None or not cfg.sample_every_eval or not is_main or is_fsdp(wrapped):
            return
        was_training = raw.training
        raw.eval()
        py_state, np_state = random.getstate(), np.random.get_state()
        try:  # generation runs the blocks eagerly: compiled for training shapes, they would recompile per length
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                    run_eagerly():
                recs = on_eval(raw, step)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            raw.train(was_training)
        for r in recs or []:
            write({"kind": "sample", "step": step, "prompt": r.get("prompt", ""), "text": r.get("text", "")})

    def save(val: float | None) -> None:
        ckpt.save_checkpoint(ckpt_root, st.step, wrapped, optimizer, scheduler, train_loader, meta,
                             val_loss=val, keep_last=cfg.keep_last, extra=dataclasses.asdict(st))

    bar = tqdm(total=cfg.steps, initial=st.step, disable=not is_main or not sys.stderr.isatty(),
               dynamic_ncols=True, desc="train")
    interrupted = False
    t_start = time.perf_counter() - st.seconds
    last_saved = st.step if resume_dir is not None else -1
    with _StopFlag() as stop:
        while st.step < cfg.steps:
            t0 = time.perf_counter()
            micro = [train_loader.next_batch() for _ in range(accum)]
            top = max(max(int(b["x"].max()), int(b["y"].max())) for b in micro)
            if top >= raw.cfg.vocab_size:
                raise UserError(f"the training data holds token id {top} but model.vocab_size is "
                                f"{raw.cfg.vocab_size}; set model.vocab_size=0 (taken from the tokenizer) or "
                                f"re-encode the data with the model's tokenizer")
            # Normalise by the units (target tokens, pairs, ...) of the whole step across ranks (DDP averages
            # gradients: x world).
            counts = torch.tensor([float(sum(objective.count(b) for b in micro))], dtype=torch.float64)
            n_targets = float(all_reduce_sum(counts.to(device))[0])
            if n_targets == 0:
                raise UserError("a training step has no target tokens (every label is masked); check the data")
            scale = dist.world / n_targets
            total = torch.zeros((), dtype=torch.float64, device=device)
            for i, b in enumerate(micro):
                b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
                # Skip DDP's gradient all-reduce on all but the last micro-batch.
                sync = i == len(micro) - 1 or not hasattr(wrapped, "no_sync")
                with (nullcontext() if sync else wrapped.no_sync()), autocast_ctx(device, precision):
                    s = objective.loss(wrapped, b)
                (s * scale).backward()
                total += s.detach().double()
            step_tokens = sum(b["x"].numel() for b in micro) * dist.world
            if SIGNAL_AT_STEP and st.step + 1 == SIGNAL_AT_STEP and dist.is_main:  # test hook (see below)
                os.kill(os.getpid(), signal.SIGTERM)
            # One all-reduce carries the loss and the stop flag, so every rank takes the same decision.
            packet = torch.tensor([0.0, 1.0 if stop.set else 0.0], dtype=torch.float64, device=device)
            packet[0] = total
            all_reduce_sum(packet)
            loss = float(packet[0]) / n_targets
            stop_now = bool(packet[1] > 0)

            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                st.skipped += 1
                st.bad_in_row += 1
                log(f"step {st.step + 1}: loss is {loss}; skipped the update "
                    f"({st.bad_in_row}/{cfg.max_bad_steps} in a row)")
                if st.bad_in_row >= cfg.max_bad_steps:
                    raise UserError(f"training stopped: the loss was NaN/Inf for {st.bad_in_row} steps in a row "
                                    f"(step {st.step + 1}); lower train.lr, keep train.grad_clip on, or check "
                                    f"the data")
            else:
                st.bad_in_row = 0
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                st.log_loss_sum += loss
                st.log_loss_n += 1
            lr = scheduler.get_last_lr()[0]
            with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            st.step += 1
            st.tokens += step_tokens
            st.log_tokens += step_tokens
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # honest timings
            dt = time.perf_counter() - t0
            st.log_seconds += dt
            st.seconds = time.perf_counter() - t_start
            step = st.step
            bar.update(1)

            if step % max(cfg.log_every, 1) == 0 or step == cfg.steps:
                avg = st.log_loss_sum / st.log_loss_n if st.log_loss_n else float("nan")
                tps = st.log_tokens / max(st.log_seconds, 1e-9)
                if peak and device.type == "cpu" and flops_tok * tps > peak:
                    peak = flops_tok * tps  # the peak was measured under load: it is at least what this step did
                mfu = flops_tok * tps / peak if peak else 0.0
                st.train_loss = avg if st.log_loss_n else st.train_loss
                write({"kind": "train", "step": step, "loss": avg, "lr": lr, "tokens": st.tokens,
                       "tok_per_s": tps, "mfu": mfu, "time": st.seconds, **objective.stats()})
                bar.set_postfix(loss=f"{avg:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.1%}")
                if bar.disable and is_main and (step % max(cfg.log_every * 10, 1) == 0 or step == cfg.steps):
                    log(f"step {step}/{cfg.steps} loss {avg:.4f} lr {lr:.2e} tok/s {tps:,.0f} mfu {mfu:.1%}")
                st.log_loss_sum, st.log_loss_n, st.log_tokens, st.log_seconds = 0.0, 0, 0, 0.0

            final = step == cfg.steps
            ckpt_due = cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0
            eval_due = cfg.eval_every > 0 and step % cfg.eval_every == 0
            val = None
            improved = early_stop = False
            if eval_due or ckpt_due or final or stop_now:
                if eval_due or final or ((ckpt_due or stop_now) and val_batches is not None):
                    val = run_eval()
                    if is_main and val is not None:
                        gap = f" (gap {val - st.train_loss:+.4f})" if st.train_loss is not None else ""
                        (bar.write if not bar.disable else log)(f"step {step}: val loss {val:.4f}{gap}")
                    if val is not None and cfg.early_stop_patience > 0:
                        improved = st.evals_since_best == 0
                        early_stop = st.evals_since_best >= cfg.early_stop_patience and not final
                        st.early_stopped = early_stop
            if ckpt_due or final or stop_now or improved or early_stop:
                st.seconds = time.perf_counter() - t_start
                save(val)
                last_saved = step
            if stop_now:
                interrupted = True
                log(f"interrupted: saved a checkpoint at step {step}; continue with resume")
                break
            if early_stop:
                log(f"early stop at step {step}: validation loss has not improved for {cfg.early_stop_patience} "
                    f"evaluations (best {st.best_val:.4f}, kept as the best checkpoint)")
                break
    bar.close()
    trackers.close()
    if last_saved != st.step and st.step > 0:  # steps=0 or a resumed finished run
        save(st.final_val)
    return {"step": st.step, "train_loss": st.train_loss, "best_val_loss": st.best_val,
            "final_val_loss": st.final_val, "tokens": st.tokens, "seconds": st.seconds,
            "skipped_steps": st.skipped, "interrupted": interrupted, "early_stopped": st.early_stopped,
            "signal": (stop.signum or signal.SIGINT) if interrupted else None}
