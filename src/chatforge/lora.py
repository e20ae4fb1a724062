"""LoRA adapters on our GPT through PEFT: wrap, save the adapter alone, merge into the base weights.

Our projections are plain nn.Linear modules named like Hugging Face Llama's (q_proj ... down_proj), so PEFT's
LoRA targets them by name with no custom code. The wrapped model (a PeftModel) is what the training loop
sees: only the adapter matrices require gradients, so the optimizer (which skips frozen parameters) updates
nothing else. After training, `merge_lora` folds B @ A * alpha / rank into each base weight and returns a
plain GPT, which saves as an ordinary chatforge checkpoint: generate, chat, serve and export need no LoRA code.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.nn as nn

from .errors import UserError
from .model import GPT

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass
class LoraSettings:
    rank: int
    alpha: float = 0.0  # 0 -> 2 * rank (a common choice; the update is scaled by alpha / rank)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"LoRA rank {self.rank} must be >= 1 (0 means full fine-tuning)")
        if not self.alpha:
            self.alpha = 2.0 * self.rank
        if self.alpha <= 0:
            raise UserError(f"LoRA alpha {self.alpha} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout {self.dropout} must be in [0, 1)")
        targets = [t.strip() for t in self.targets if t.strip()]
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad or not targets:
            raise UserError(f"LoRA target modules {bad or targets} are not known; choose from {', '.join(LORA_TARGETS)}")
        self.targets = sorted(set(targets), key=LORA_TARGETS.index)

    def to_dict(self) -> dict:
        return asdict(self)


def add_lora(model: GPT, settings: LoraSettings) -> nn.Module:
    """Wrap `model` (in place) with fresh LoRA adapters; only the adapters require gradients.

    lora_A starts random (seeded by the caller's torch seed) and lora_B at zero, so the wrapped model
    computes exactly what the base does until the first update.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), bias="none")
    return get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    from peft import PeftModel
    return isinstance(model, PeftModel)


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    params = list(model.parameters())  # parameters() de-duplicates tied tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_adapter(model: nn.Module, out_dir: Path, base: str | None = None) -> Path:
    """Write the adapter alone (adapter_model.safetensors + adapter_config.json, PEFT's layout).

    base: the chatforge checkpoint the adapter belongs to, written into adapter_config.json's
    base_model_name_or_path afterwards (set before saving, PEFT would look it up on the hub)."""
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if base is not None:
        cfg_path = out_dir / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(base)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_adapter(base: GPT, adapter_dir: Path, trainable: bool = False) -> nn.Module:
    """Base GPT + a saved adapter -> the wrapped model (base + adapter), for inspection or further training."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise UserError(f"{adapter_dir}: not a LoRA adapter folder (missing {', '.join(missing)})")
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


def adapter_settings(adapter_dir: Path) -> LoraSettings:
    c = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return LoraSettings(rank=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0.0)),
                        targets=list(c["target_modules"]))


def merge_lora(model: nn.Module) -> GPT:
    """Fold the adapters into the base weights and return the plain GPT (the wrapper is consumed)."""
    merged = model.merge_and_unload()
    if not isinstance(merged, GPT):
        raise TypeError(f"merging gave a {type(merged).__name__}, expected the chatforge GPT")
    return merged
