"""Optimizers and learning-rate schedules.

Weight decay applies to matrices only (>= 2-D): decaying norms' gains pulls them towards zero for no benefit.
Muon (Keller Jordan, 2024; torch.optim.Muon) orthogonalises the momentum of each hidden 2-D matrix with a
Newton-Schulz iteration; embeddings, the output head and 1-D parameters keep AdamW. The Muon update is rescaled
to AdamW's typical RMS (0.2 * sqrt(max(rows, cols)), Moonshot 2025), so one `lr` and `weight_decay` serve both.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import TrainConfig
from .distributed import unwrap
from .errors import UserError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in unwrap(model).parameters():  # parameters() de-duplicates tied weights
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


@torch.no_grad()
def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of G = U S V^T, in fp32: torch.optim.Muon's quintic iteration (same coefficients,
    same normalisation), which runs it in bf16 only."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def bf16_orthogonalisation_pays(device: torch.device) -> bool:
    """torch.optim.Muon's bf16 Newton-Schulz pays on GPUs and on CPUs whose bf16 matmul beats fp32 (the peaks
    cached by machine.py, measured once when missing); on a CPU without bf16 units it is ~100x slower."""
    if device.type != "cpu":
        return True
    from . import machine
    if "avx512_bf16" not in machine.cpu()[1] and "amx_bf16" not in machine.cpu()[1]:
        return False
    fp32, bf16 = machine.seen("fp32"), machine.seen("bf16")
    return bf16 > fp32 if fp32 and bf16 else machine.bf16_speedup() > 1.0


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon for the groups flagged use_muon=True, fused torch.optim.AdamW for the rest, stepped as one
    optimizer with one state_dict. LambdaLR sees every group, so one schedule drives both halves.

    What is ours and not PyTorch's: the split into two halves in one object, and an fp32 Newton-Schulz step
    (`fp32_ns=True`) for CPUs where bf16 is slow: torch's Muon hard-codes bf16. The fp32 step does exactly what
    torch's single-tensor Muon does (Nesterov lerp, decoupled weight decay, match_rms_adamw scale
    0.2*sqrt(max(rows, cols)), so one `lr` and `weight_decay` serve both halves) and keeps the same state
    ("momentum_buffer"), so a checkpoint resumes on either kind of machine.
    """

    def __init__(self, groups: list[dict], lr: float, momentum: float = 0.95, betas=(0.9, 0.95),
                 eps: float = 1e-8, ns_steps: int = 5, fp32_ns: bool | None = None, fused: bool | None = None):
        muon_groups = [g for g in groups if g.get("use_muon")]
        adam_groups = [g for g in groups if not g.get("use_muon")]
        # The group dicts are shared: the inner optimizers fill in their defaults, and an lr set on
        # self.param_groups (by LambdaLR) is the lr they step with.
        super().__init__(groups, dict(lr=lr, weight_decay=0.0, use_muon=False))
        self.muon = torch.optim.Muon(muon_groups, lr=lr, momentum=momentum, nesterov=True, ns_steps=ns_steps,
                                     adjust_lr_fn="match_rms_adamw") if muon_groups else None
        self.adamw = torch.optim.AdamW(adam_groups, lr=lr, betas=betas, eps=eps, fused=fused) if adam_groups else None
        first = next((p for g in groups for p in g["params"]), None)
        if fp32_ns is None:
            fp32_ns = first is not None and not bf16_orthogonalisation_pays(first.device)
        self.fp32_ns = fp32_ns

    def _inner(self) -> list[tuple[str, torch.optim.Optimizer]]:
        return [(k, o) for k, o in (("muon", self.muon), ("adamw", self.adamw)) if o is not None]

    @torch.no_grad()
    def _fp32_muon_step(self) -> None:
        for group in self.muon.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.muon.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)
                u = newton_schulz(p.grad.lerp(buf, mom), group["ns_steps"], group["eps"])
                p.mul_(1 - lr * wd)
                p.add_(u, alpha=-lr * 0.2 * math.sqrt(max(p.shape[0], p.shape[1])))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.muon is not None:
            self._fp32_muon_step() if self.fp32_ns else self.muon.step()
        if self.adamw is not None:
            self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        return {k: o.state_dict() for k, o in self._inner()}

    def load_state_dict(self, state_dict: dict) -> None:
        for k, o in self._inner():
            if k not in state_dict:
                raise UserError("this checkpoint's optimizer state is not a Muon state; resume with the "
                                "optimizer it was trained with")
            o.load_state_dict(state_dict[k])
        # load_state_dict replaces the inner groups; keep one set of group dicts shared with the scheduler.
        self.param_groups = [g for _, o in self._inner() for g in o.param_groups]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    name = cfg.optimizer.lower()
    params = list(unwrap(model).parameters())
    sharded = any(type(p).__name__ == "DTensor" for p in params)
    # The fused kernel does the whole update in one pass per tensor: on CPU about 5x faster than the
    # multi-op path (measured on a 2.6M-parameter model), on CUDA the usual choice. FSDP keeps the default.
    fused = bool(params) and params[0].device.type in ("cpu", "cuda") and not sharded
    if name == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 fused=True if fused else None)
    if name == "sgd":
        return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.momentum > 0)
    if name == "muon":
        raw = unwrap(model)
        if any(type(p).__name__ == "DTensor" for p in params):
            raise UserError("train.optimizer=muon does not support FSDP-sharded parameters; use adamw or DDP")
        # Embedding and output head are lookups/classifiers, not hidden linear maps: AdamW suits them better.
        skip = {id(p) for m in (getattr(raw, "embed_tokens", None), getattr(raw, "lm_head", None)) if m is not None
                for p in m.parameters()}
        muon, adam_decay, adam_no_decay = [], [], []
        for p in raw.parameters():
            if not p.requires_grad:
                continue
            if p.dim() == 2 and id(p) not in skip:
                muon.append(p)
            elif p.dim() >= 2:
                adam_decay.append(p)
            else:
                adam_no_decay.append(p)
        groups = [g for g in (
            {"params": muon, "use_muon": True, "weight_decay": cfg.weight_decay},
            {"params": adam_decay, "use_muon": False, "weight_decay": cfg.weight_decay},
            {"params": adam_no_decay, "use_muon": False, "weight_decay": 0.0}) if g["params"]]
        return Muon(groups, lr=cfg.lr, momentum=cfg.momentum, betas=(cfg.beta1, cfg.beta2),
                    fused=True if fused else None)
    raise UserError(f"train.optimizer '{cfg.optimizer}' is not known; use adamw, sgd or muon")


def lr_lambda(cfg: TrainConfig):
    """step -> lr multiplier: linear warmup, then cosine / wsd (warmup-stable-decay) / constant."""
    steps, warm, floor = max(cfg.steps, 1), max(cfg.warmup_steps, 0), cfg.min_lr_ratio
    kind = cfg.schedule.lower()
    if kind not in ("cosine", "wsd", "constant"):
        raise UserError(f"train.schedule '{cfg.schedule}' is not known; use cosine, wsd or constant")

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        if kind == "cosine":
            progress = min(1.0, (step - warm) / max(1, steps - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = max(warm, int(steps * (1 - cfg.decay_fraction)))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, steps - decay_start))
        return 1.0 - (1 - floor) * progress

    return f


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
