"""Checkpoints: ckpt_root/step_NNNNNN/{model.safetensors, meta.json, state.pt}, latest.json, best.json.

A checkpoint is written into a temporary folder and renamed into place, and the pointers are replaced
atomically, so a kill mid-save leaves the previous checkpoint loadable. state.pt holds only tensors and plain
Python values, so it loads with torch.load(weights_only=True).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from .config import ModelConfig
from .distributed import is_distributed, is_fsdp, unwrap
from .errors import UserError
from .model import GPT

STEP_RE = re.compile(r"^step_(\d+)$")
FILES = ("model.safetensors", "meta.json", "state.pt")


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk: a rename alone does not survive power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the files themselves were synced
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def readable(ckpt_dir: Path) -> str | None:
    """None if the checkpoint's files are whole (safetensors header and sizes, meta.json, state.pt), else why not."""
    ckpt_dir = Path(ckpt_dir)
    try:
        st = ckpt_dir / "model.safetensors"
        size = st.stat().st_size
        with open(st, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or not 0 < n <= size - 8:
                return f"{st} is {size} bytes: no safetensors header"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if size != 8 + n + end:
            return f"{st} is {size} bytes, its header needs {8 + n + end}"
        json.loads((ckpt_dir / "meta.json").read_text())
        if (ckpt_dir / "state.pt").stat().st_size == 0:
            return f"{ckpt_dir / 'state.pt'} is empty"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"{ckpt_dir}: {type(e).__name__}: {e}"
    return None


def _is_main() -> bool:
    return not is_distributed() or torch.distributed.get_rank() == 0


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full_states(model: nn.Module, optimizer) -> tuple[dict, dict | None]:
    """Model and optimizer state as full (unsharded) dicts; under FSDP every rank must call this."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(unwrap(model), options=opts)
        osd = get_optimizer_state_dict(unwrap(model), optimizer, options=opts) if optimizer is not None else None
        return msd, osd
    return unwrap(model).state_dict(), optimizer.state_dict() if optimizer is not None else None


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir()
             if (m := STEP_RE.match(p.name)) and all((p / f).is_file() for f in FILES)]
    return [p for _, p in sorted(found)]


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, optimizer, scheduler, loader, meta: dict,
                    *, val_loss: float | None = None, keep_last: int = 2, extra: dict | None = None) -> Path:
    """Write step_{step:06d} atomically, update latest.json/best.json, prune old ones (never the best).

    Under DDP/FSDP call it on every rank (FSDP gathers shards); only rank 0 writes. extra: more
    picklable-free state (e.g. the training loop's counters) stored in state.pt.
    """
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{step:06d}"
    msd, osd = _full_states(model, optimizer)
    if not _is_main():
        return final
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(".tmp-step_*"):  # left by a killed save: never a valid checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ckpt_root / f".tmp-step_{step:06d}-{os.getpid()}"
    tmp.mkdir()
    plain = unwrap(model)
    if is_fsdp(model):  # a plain CPU copy so save_model sees ordinary (tied) tensors
        plain = GPT(plain.cfg)
        plain.load_state_dict(msd)
    st_save_model(plain, str(tmp / "model.safetensors"))
    meta = {**meta, "step": step, "val_loss": val_loss}
    if "model" not in meta and hasattr(plain, "cfg"):
        meta["model"] = dataclasses.asdict(plain.cfg)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    torch.save({
        "optimizer": osd,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "loader": loader.state_dict() if loader is not None else None,
        "rng": rng_state(),
        "extra": extra or {},
    }, tmp / "state.pt")
    for f in FILES:
        _fsync(tmp / f)
    _fsync(tmp)
    if final.exists():  # re-saving the same step (e.g. an interrupt right after a periodic save)
        trash = ckpt_root / f".tmp-step_{step:06d}-old{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(ckpt_root)
    _write_json(ckpt_root / "latest.json", {"step": step, "path": final.name})
    best = _read_pointer(ckpt_root / "best.json")
    best_dir = ckpt_root / best["path"] if best else None
    if val_loss is not None and (best is None or best.get("val_loss") is None or best_dir is None
                                 or not best_dir.is_dir() or val_loss <= best["val_loss"]):
        _write_json(ckpt_root / "best.json", {"step": step, "path": final.name, "val_loss": val_loss})
        best_dir = final
    # Prune: keep the newest keep_last and the best.
    ckpts = list_checkpoints(ckpt_root)
    keep = set(ckpts[-max(keep_last, 1):]) | {final}
    if best_dir is not None:
        keep.add(best_dir)
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    return final


def _read_pointer(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def resolve_checkpoint(ckpt_root: Path, which: str = "best") -> Path:
    """best | last (alias latest) | step_N | N | a checkpoint folder -> the checkpoint folder."""
    ckpt_root = Path(ckpt_root)
    which = str(which)
    direct = Path(which)
    if direct.is_dir() and all((direct / f).is_file() for f in FILES):
        return direct
    ckpts = list_checkpoints(ckpt_root)
    available = ", ".join(p.name for p in ckpts) or "none"
    if not ckpts:
        raise UserError(f"no checkpoint in {ckpt_root}; train first (available: {available})")
    if which in ("last", "latest"):
        ptr = _read_pointer(ckpt_root / "latest.json")
        if ptr and (ckpt_root / ptr["path"]) in ckpts:
            cand = ckpt_root / ptr["path"]
            ckpts = [c for c in ckpts if c != cand] + [cand]
        for cand in reversed(ckpts):  # the newest whole one: a file cut short (power loss) is passed over
            why = readable(cand)
            if why is None:
                return cand
            warnings.warn(f"checkpoint {cand.name} is damaged ({why}); using an earlier one", RuntimeWarning,
                          stacklevel=2)
        raise UserError(f"every checkpoint in {ckpt_root} is damaged; start again with --force")
    if which == "best":
        ptr = _read_pointer(ckpt_root / "best.json")
        if ptr and (ckpt_root / ptr["path"]) in ckpts and readable(ckpt_root / ptr["path"]) is None:
            return ckpt_root / ptr["path"]
        return resolve_checkpoint(ckpt_root, "last")  # no validation ran: the newest is the best we know
    m = re.fullmatch(r"(?:step_)?(\d+)", which)
    if m:
        cand = ckpt_root / f"step_{int(m.group(1)):06d}"
        if cand in ckpts:
            return cand
    raise UserError(f"checkpoint '{which}' not found in {ckpt_root}; use best, last or one of: {available}")


def read_meta(ckpt_dir: Path) -> dict:
    return json.loads((Path(ckpt_dir) / "meta.json").read_text())


def load_model(ckpt_dir: Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Build the GPT described by meta['model'] and load its weights; returned in eval mode."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    model = GPT(ModelConfig(**meta["model"]))
    st_load_model(model, str(ckpt_dir / "model.safetensors"), device=str(device))
    return model.to(device).eval(), meta


def load_training_state(ckpt_dir: Path, model: nn.Module, optimizer, scheduler, loader) -> dict:
    """Restore weights, optimizer, scheduler, loader and RNG states in place; returns state.pt's 'extra'."""
    ckpt_dir = Path(ckpt_dir)
    state = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=True)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        plain = GPT(unwrap(model).cfg)
        st_load_model(plain, str(ckpt_dir / "model.safetensors"))
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(unwrap(model), plain.state_dict(), options=opts)
        if optimizer is not None and state["optimizer"] is not None:
            set_optimizer_state_dict(unwrap(model), optimizer, state["optimizer"], options=opts)
    else:
        st_load_model(unwrap(model), str(ckpt_dir / "model.safetensors"),
                      device=str(next(unwrap(model).parameters()).device))
        if optimizer is not None and state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if loader is not None and state["loader"] is not None:
        loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"])
    return state.get("extra", {})
