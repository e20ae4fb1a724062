"""Processes, devices and how the model is run: torchrun setup, device choice, autocast, and `parallelize`
(activation checkpointing -> torch.compile -> DDP / FSDP2), applied from outside the model.
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


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """auto -> cuda, then mps, then cpu; an explicit name must be available."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available; use device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device=mps but MPS is not available; use device=auto or cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserError(f"device '{name}' is not known; use auto, cpu, cuda or mps")
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


def all_gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if not is_distributed():
        return [obj]
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def autocast_ctx(device: torch.device | str, precision: str = "fp32"):
    """bf16 autocast when precision is "bf16" (machine.choose_precision decides; weights and optimizer state
    stay fp32, losses and softmax are computed in fp32); nothing for fp32."""
    dev = torch.device(device)
    if precision == "bf16" and dev.type in ("cuda", "cpu"):
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# compile=auto means CUDA only. On CPU, inductor's kernels were measured at 1.00-1.07x eager on a quiet 2-core machine
# (benchmarks/bench_train.py), cost 10-60 s to compile, and made run-to-run losses differ in the 4th decimal (the demo
# preset, same seed): CPU runs stay eager and reproducible unless compile=on is asked for.
def use_compile(cfg, device: torch.device) -> bool:
    """Whether to torch.compile. Depends only on the config and device, so a resume decides alike."""
    mode = str(cfg.compile).lower()
    if mode in ("auto", ""):
        return device.type == "cuda"
    if mode in ("on", "true", "1", "yes"):
        return True
    if mode in ("off", "false", "0", "no"):
        return False
    raise UserError(f"train.compile '{cfg.compile}' is not known; use auto, on or off")


def parallelize(model: nn.Module, cfg, dist: DistInfo, strategy: str | None = None) -> nn.Module:
    """Prepare `model` (already on dist.device) for training, torchtitan's order: activation checkpointing of
    each block, then torch.compile of each block, then DDP or FSDP2 (strategy, default cfg.strategy; only
    under a multi-process group). Returns the module to train: the DDP wrapper, or the model itself.

    cfg needs activation_checkpointing, compile and strategy (a TrainConfig). The blocks are changed in
    place, state_dict names kept (checkpoint_wrapper strips its prefix); `unparallelize` undoes that.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = getattr(model, "layers", None)
    layers = layers if layers is not None else []
    if cfg.activation_checkpointing:
        for i, block in enumerate(layers):
            if not _is_checkpointed(block):
                # Recompute the block's activations in backward (non-reentrant, RNG replayed: same dropout).
                layers[i] = checkpoint_wrapper(block)
    if use_compile(cfg, dist.device):
        for block in layers:
            block.compile()  # in place, per block: names unchanged, and DDP/FSDP2 hooks stay outside the graphs
    return wrap_model(model, (strategy or cfg.strategy) if dist.world > 1 else "none", dist.device)


def unparallelize(model: nn.Module) -> nn.Module:
    """Undo parallelize's block changes (checkpoint wrappers, compiled forwards) so the model runs eagerly,
    e.g. to generate; DDP's wrapper is simply dropped and FSDP2's sharding stays. Returns the plain model."""
    raw = unwrap(model)
    layers = getattr(raw, "layers", None)
    for i, block in enumerate(layers if layers is not None else []):
        for m in (block, getattr(block, "_checkpoint_wrapped_module", block)):
            if getattr(m, "_compiled_call_impl", None) is not None:
                m._compiled_call_impl = None  # what nn.Module.compile set
        if _is_checkpointed(block):
            layers[i] = block._checkpoint_wrapped_module
    return raw


def run_eagerly():
    """A context in which torch.compile'd code runs eagerly (torch >= 2.6; elsewhere it does nothing)."""
    if hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")  # set on creation, restored on exit: create it in `with`
    return contextlib.nullcontext()


def _is_checkpointed(block: nn.Module) -> bool:
    return hasattr(block, "_checkpoint_wrapped_module")


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
