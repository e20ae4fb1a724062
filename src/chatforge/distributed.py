"""Processes and devices: torchrun setup, device choice, DDP/FSDP2 wrapping, autocast.

The model itself knows nothing of this; train.py applies it from outside.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn as nn

from .errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True


def pick_device(name: str = "auto") -> torch.device:
    """auto -> cuda, then mps, then cpu; an explicit name must be available."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but CUDA is not available; use device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("train.device=mps but MPS is not available; use device=auto or cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserError(f"train.device '{name}' is not known; use auto, cpu, cuda or mps")
    return torch.device(name)


def setup(device: str = "auto") -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a single process when it is absent."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=pick_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                 device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev, is_main=rank == 0)


def teardown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def wrap_model(model: nn.Module, strategy: str = "ddp", device: torch.device | None = None) -> nn.Module:
    """ddp: replicate + all-reduce gradients. fsdp: FSDP2 fully_shard per block then the root. none: as is.

    Without an initialised multi-process group every strategy returns the model unchanged.
    """
    strategy = (strategy or "none").lower()
    if strategy not in ("ddp", "fsdp", "none"):
        raise UserError(f"strategy '{strategy}' is not known; use ddp, fsdp or none")
    if strategy == "none" or not is_distributed():
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = device or next(model.parameters()).device
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "layers", []):
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP (FSDP2 shards in place, so it is the module itself)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def is_fsdp(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in unwrap(model).parameters())


def autocast_ctx(device: torch.device | str):
    """bf16 autocast on CUDA (weights stay fp32); nothing elsewhere (CPU/MPS bf16 autocast is slower or flaky)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
