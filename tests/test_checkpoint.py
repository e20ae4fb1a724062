"""Checkpoints: identical logits after reload, pointers and pruning, atomic saves, full training state."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chatforge.checkpoint import (list_checkpoints, load_model, load_training_state, resolve_checkpoint,
                                  save_checkpoint)
from chatforge.config import ModelConfig, TrainConfig
from chatforge.data.loader import TokenLoader
from chatforge.errors import UserError
from chatforge.model import GPT
from chatforge.optim import build_optimizer, build_scheduler
from chatforge.train import loss_sum

MCFG = ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, seq_len=16, vocab_size=64)


def setup_all(seed=0):
    torch.manual_seed(seed)
    model = GPT(MCFG)
    cfg = TrainConfig(steps=20, lr=1e-2, warmup_steps=2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    loader = TokenLoader([np.random.default_rng(0).integers(0, 64, 3000).astype(np.uint16)], 4, 16, seed=1)
    return model, opt, sched, loader


def step(model, opt, sched, loader):
    s, n = loss_sum(model, loader.next_batch())
    (s / n).backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    return float(s.detach() / n)


def test_reload_gives_identical_logits(tmp_path):
    model, opt, sched, loader = setup_all()
    for _ in range(3):
        step(model, opt, sched, loader)
    d = save_checkpoint(tmp_path, 3, model, opt, sched, loader, {"stage": "pretrain"}, val_loss=1.5)
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "model.safetensors", "state.pt"]
    meta = json.loads((d / "meta.json").read_text())
    assert meta["step"] == 3 and meta["val_loss"] == 1.5 and meta["model"]["n_embd"] == 32
    loaded, meta2 = load_model(d)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()  # still tied
    x = torch.randint(0, 64, (2, 16))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_training_state_continues_identically(tmp_path):
    model, opt, sched, loader = setup_all()
    for _ in range(3):
        step(model, opt, sched, loader)
    save_checkpoint(tmp_path, 3, model, opt, sched, loader, {})
    expected = [step(model, opt, sched, loader) for _ in range(3)]
    model2, opt2, sched2, loader2 = setup_all(seed=99)  # different init: everything must come from the file
    load_training_state(resolve_checkpoint(tmp_path, "last"), model2, opt2, sched2, loader2)
    assert [step(model2, opt2, sched2, loader2) for _ in range(3)] == expected


def test_pointers_pruning_keeps_best(tmp_path):
    model, opt, sched, loader = setup_all()
    vals = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: None}
    for s, v in vals.items():
        save_checkpoint(tmp_path, s, model, opt, sched, loader, {}, val_loss=v, keep_last=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_000002", "step_000004", "step_000005"]  # best (2) + last two
    assert resolve_checkpoint(tmp_path, "best").name == "step_000002"
    assert resolve_checkpoint(tmp_path, "last").name == "step_000005"
    assert resolve_checkpoint(tmp_path, "step_4").name == "step_000004"
    assert resolve_checkpoint(tmp_path, "4").name == "step_000004"
    with pytest.raises(UserError, match="step_000002, step_000004, step_000005"):
        resolve_checkpoint(tmp_path, "step_3")
    with pytest.raises(UserError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "nothing", "best")


def test_best_falls_back_to_last_without_validation(tmp_path):
    model, opt, sched, loader = setup_all()
    save_checkpoint(tmp_path, 1, model, opt, sched, loader, {})
    assert resolve_checkpoint(tmp_path, "best").name == "step_000001"


def test_leftover_tmp_dir_from_killed_save_is_harmless(tmp_path):
    model, opt, sched, loader = setup_all()
    save_checkpoint(tmp_path, 1, model, opt, sched, loader, {}, val_loss=2.0)
    # What a save killed half-way leaves behind: a temp folder with a partial file, and a newer step_ folder
    # missing files (as if written by something that isn't atomic).
    junk = tmp_path / ".tmp-step_000002-12345"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "step_000003").mkdir()
    (tmp_path / "step_000003" / "meta.json").write_text("{}")
    assert resolve_checkpoint(tmp_path, "last").name == "step_000001"
    loaded, _ = load_model(resolve_checkpoint(tmp_path, "best"))
    assert isinstance(loaded, GPT)
    save_checkpoint(tmp_path, 2, model, opt, sched, loader, {})
    assert not junk.exists()  # cleaned by the next save
    assert resolve_checkpoint(tmp_path, "last").name == "step_000002"


def test_resave_same_step_replaces(tmp_path):
    model, opt, sched, loader = setup_all()
    save_checkpoint(tmp_path, 5, model, opt, sched, loader, {"a": 1})
    save_checkpoint(tmp_path, 5, model, opt, sched, loader, {"a": 2})
    assert json.loads((tmp_path / "step_000005" / "meta.json").read_text())["a"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


@pytest.mark.parametrize("damage", ["empty", "cut", "header"])
def test_a_damaged_latest_checkpoint_is_passed_over_for_resume(tmp_path, damage):
    """Power loss can leave a renamed checkpoint with a short or empty file: resume takes the one before it."""
    model, opt, sched, loader = setup_all()
    root = tmp_path / "ckpt"
    for s in (1, 2):
        step(model, opt, sched, loader)
        save_checkpoint(root, s, model, opt, sched, loader, {"stage": "pretrain"}, keep_last=3)
    st = root / "step_000002" / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes({"empty": b"", "cut": data[: len(data) // 2], "header": b"\xff" * 64}[damage])
    with pytest.warns(RuntimeWarning, match="step_000002 is damaged"):
        assert resolve_checkpoint(root, "last").name == "step_000001"
    (root / "step_000001" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="damaged"), pytest.warns(RuntimeWarning):
        resolve_checkpoint(root, "last")
