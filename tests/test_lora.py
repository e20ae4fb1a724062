"""LoRA on our GPT through PEFT: only adapters train (in the one training loop), the adapter saves alone and
small, merging gives the same logits as base + adapter, and a LoRA run resumes exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chatforge.checkpoint import load_model, save_checkpoint
from chatforge.config import ModelConfig, TrainConfig
from chatforge.data.loader import TokenLoader, iter_eval_batches
from chatforge.errors import UserError
from chatforge.lora import (LORA_TARGETS, LoraSettings, add_lora, adapter_settings, load_adapter, merge_lora,
                            save_adapter, trainable_counts)
from chatforge.model import GPT
from chatforge.train import train

VOCAB = 97
CFG = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=32, vocab_size=VOCAB)


pytestmark = pytest.mark.usefixtures("one_thread")


def base_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG)


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    # A learnable stream: a repeating pattern with noise, so a few steps move the loss.
    pattern = np.tile(np.arange(VOCAB, dtype=np.uint16), 60)
    noise = rng.integers(0, VOCAB, len(pattern)).astype(np.uint16)
    stream = np.where(rng.random(len(pattern)) < 0.1, noise, pattern)
    return stream[:5000], stream[5000:]


def tcfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, lr=1e-2, schedule="constant", warmup_steps=0, eval_every=0,
                       eval_batches=2, log_every=1, seed=3, device="cpu", compile="off")


def lora_train(out, steps: int, resume: bool = False, dropout: float = 0.1):
    tr, va = data()
    torch.manual_seed(11)
    model = add_lora(base_model(), LoraSettings(rank=4, alpha=8, dropout=dropout))
    res = train(model, tcfg(steps), TokenLoader([tr], 4, CFG.seq_len, seed=5), out, resume=resume,
                val_batches=lambda: iter_eval_batches([va], 4, CFG.seq_len, max_batches=2),
                meta={"stage": "finetune", "lora": "r4"}, log=lambda s: None)
    return model, res


def test_settings_validate_and_default_alpha():
    s = LoraSettings(rank=8)
    assert s.alpha == 16 and s.targets == list(LORA_TARGETS)
    assert LoraSettings(rank=2, targets=["v_proj", "q_proj", "q_proj"]).targets == ["q_proj", "v_proj"]
    for bad in (dict(rank=0), dict(rank=4, targets=["qkv"]), dict(rank=4, dropout=1.0), dict(rank=4, alpha=-1)):
        with pytest.raises(UserError):
            LoraSettings(**bad)


def test_only_adapters_train_merge_equals_base_plus_adapter(tmp_path):
    original = {k: v.clone() for k, v in base_model().state_dict().items()}
    model, res = lora_train(tmp_path / "run", steps=6)
    assert res["step"] == 6
    n_train, n_all = trainable_counts(model)
    assert 0 < n_train < n_all * 0.25
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())

    # Base weights did not move; the adapters did (lora_B starts at zero).
    state = model.state_dict()
    for name, t in original.items():
        key = "base_model.model." + name.replace("_proj.weight", "_proj.base_layer.weight")
        assert torch.equal(state[key], t), name
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)

    # The adapter alone: PEFT's two files, far smaller than the model.
    adapter = save_adapter(model, tmp_path / "adapter", base="base-ckpt")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == sorted(LORA_TARGETS)
    assert cfg["base_model_name_or_path"] == "base-ckpt"
    assert adapter_settings(adapter).rank == 4
    model_bytes = sum(p.numel() * 4 for p in base_model().parameters())
    assert (adapter / "adapter_model.safetensors").stat().st_size < model_bytes * 0.25

    x = torch.randint(0, VOCAB, (2, CFG.seq_len), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        wrapped = model(x)
        reloaded = load_adapter(base_model(), adapter).eval()  # fresh base + saved adapter
        assert torch.equal(reloaded(x), wrapped)
        plain = base_model()(x)
        assert (wrapped - plain).abs().max() > 1e-4  # the adapter changes the function

        merged = merge_lora(model).eval()
        assert type(merged) is GPT and set(merged.state_dict()) == set(original)
        torch.testing.assert_close(merged(x), wrapped, atol=1e-5, rtol=0)

    # The merged model is an ordinary checkpoint: load_model rebuilds it with no LoRA code.
    save_checkpoint(tmp_path / "ckpt", 6, merged, None, None, None, {"stage": "finetune"}, val_loss=1.0)
    loaded, meta = load_model(tmp_path / "ckpt" / "step_000006")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), wrapped, atol=1e-5, rtol=0)
    assert meta["step"] == 6


def test_lora_run_resumes_exactly(tmp_path):
    """Training checkpoints hold the wrapped state dict; re-wrapping the base then resuming continues bit-exactly."""
    def losses(out):
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}

    lora_train(tmp_path / "straight", steps=8)
    lora_train(tmp_path / "split", steps=4)
    lora_train(tmp_path / "split", steps=8, resume=True)
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 9))
    assert split == straight
