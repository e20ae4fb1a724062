"""The training loop: real learning, grad accumulation, NaN handling, optimizers, schedules, resume guards,
early stopping, fixed-prompt samples, bad-input errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.config import ModelConfig, TrainConfig
from chatforge.data.loader import SFTLoader, TokenLoader, iter_eval_batches
from chatforge.errors import UserError
from chatforge.model import GPT
from chatforge.optim import build_optimizer, lr_lambda
from chatforge.distributed import DistInfo
from chatforge.machine import _best_seen
from chatforge.train import resolve_grad_accum, train

# One thread: on a shared 2-core machine a second OpenMP thread mostly waits for a time slice.
torch.set_num_threads(1)


def byte_corpus() -> tuple[np.ndarray, np.ndarray]:
    """Real text: the stdlib's os.py as byte tokens (vocab 256, no tokenizer needed)."""
    data = np.frombuffer(Path(os.__file__).read_bytes(), dtype=np.uint8).astype(np.uint16)
    n = int(len(data) * 0.9)
    return data[:n], data[n:]


def unigram_entropy(tokens: np.ndarray) -> float:
    p = np.bincount(tokens, minlength=256) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def tiny(vocab=256, seq=32, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_kv_head=2, n_embd=48, seq_len=seq, vocab_size=vocab, **kw))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_below_unigram_entropy(tmp_path):
    tr, va = byte_corpus()
    h = unigram_entropy(tr)
    cfg = TrainConfig(steps=80, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=40, log_every=10,
                      precision="fp32")  # MFU below is checked against the fp32 peak
    res = train(tiny(seq=64), cfg, TokenLoader([tr], 16, 32, seed=0), tmp_path,  # context 64, trained at 32
                val_batches=lambda: iter_eval_batches([va], 16, 32, max_batches=4), meta={"stage": "pretrain"})
    assert res["step"] == 80 and res["skipped_steps"] == 0
    assert res["final_val_loss"] < h - 0.2, (res, h)
    recs = metrics(tmp_path)
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(10, 81, 10))
    assert set(train_recs[0]) == {"kind", "step", "loss", "lr", "tokens", "tok_per_s", "mfu", "time"}
    assert train_recs[-1]["tokens"] == 80 * 16 * 32
    from chatforge.train import cpu_peak_flops
    flops = tiny(seq=64).flops_per_token(32)  # MFU = model FLOPs per token (attention over the 32 trained on)
    # x tokens/s / the machine's measured peak
    assert all(r["mfu"] == pytest.approx(flops * r["tok_per_s"] / max(cpu_peak_flops(), flops * r["tok_per_s"]),
                                         rel=1e-6) for r in train_recs)
    assert [r["step"] for r in recs if r["kind"] == "val"] == [40, 80]
    assert res["best_val_loss"] == min(r["val_loss"] for r in recs if r["kind"] == "val")
    assert (tmp_path / "ckpt" / "best.json").exists()


def _sft_examples():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(16):
        n = int(rng.integers(4, 15))
        ids = [0] + rng.integers(1, 40, n).tolist()
        mask = [0] * (n // 2) + [1] * (n + 1 - n // 2)
        out.append((ids, mask))
    return out


def test_grad_accumulation_1x8_equals_8x1(tmp_path):
    """Token-weighted normalisation: examples of different lengths still give the same update."""
    ex = _sft_examples()
    params = []
    for bs, acc in ((8, 1), (1, 8)):
        model = tiny(vocab=40, seq=16)
        cfg = TrainConfig(steps=2, batch_size=bs, grad_accum=acc, lr=1e-2, warmup_steps=0, eval_every=0,
                          grad_clip=0.0, log_every=1, precision="fp32")  # compared to 1e-6
        train(model, cfg, SFTLoader(ex, bs, 16, pad_id=0, seed=0, pack=False), tmp_path / f"{bs}x{acc}",
              val_batches=None, meta={})
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    init = torch.cat([p.detach().flatten() for p in tiny(vocab=40, seq=16).parameters()])
    assert not torch.allclose(params[0], init)
    torch.testing.assert_close(params[0], params[1], atol=1e-5, rtol=1e-4)  # Adam amplifies fp rounding a little


class NaNOnce:
    """A forward hook that poisons the output of one chosen call: a real NaN in the real loss."""

    def __init__(self, at: set[int]):
        self.calls, self.at = 0, at

    def __call__(self, module, args, output):
        self.calls += 1
        return output * float("nan") if self.calls in self.at else output


def test_nan_step_is_skipped_and_training_continues(tmp_path):
    tr, _ = byte_corpus()
    model = tiny()
    model.register_forward_hook(NaNOnce({3}))
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=0, eval_every=0, log_every=1)
    logs: list[str] = []
    res = train(model, cfg, TokenLoader([tr], 4, 32), tmp_path, val_batches=None, meta={}, log=logs.append)
    assert res["skipped_steps"] == 1 and res["step"] == 6
    assert any("skipped the update" in m for m in logs)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_bad_steps_stop_with_user_error(tmp_path):
    tr, _ = byte_corpus()
    model = tiny()
    model.register_forward_hook(NaNOnce(set(range(100))))
    cfg = TrainConfig(steps=20, batch_size=4, warmup_steps=0, eval_every=0, max_bad_steps=3)
    with pytest.raises(UserError, match="NaN/Inf for 3 steps in a row"):
        train(model, cfg, TokenLoader([tr], 4, 32), tmp_path, val_batches=None, meta={}, log=lambda m: None)


@pytest.mark.parametrize("opt,lr", [("sgd", 0.3), ("muon", 0.02)])
def test_other_optimizers_reduce_loss(tmp_path, opt, lr):
    tr, _ = byte_corpus()
    cfg = TrainConfig(steps=40, batch_size=8, optimizer=opt, lr=lr, warmup_steps=2, eval_every=0, log_every=5)
    train(tiny(), cfg, TokenLoader([tr], 8, 32, seed=0), tmp_path, val_batches=None, meta={})
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert losses[-1] < losses[0] - 1.0, losses


def test_muon_groups_and_state_dict():
    model = tiny()
    opt = build_optimizer(model, TrainConfig(optimizer="muon"))
    muon = [g for g in opt.param_groups if g["use_muon"]][0]["params"]
    assert id(model.embed_tokens.weight) not in {id(p) for p in muon}  # embeddings/head stay on AdamW
    assert len(muon) == 2 * 7  # q,k,v,o,gate,up,down per layer
    x = torch.randint(0, 256, (2, 32))
    model(x).logsumexp(-1).mean().backward()
    opt.step()
    sd = opt.state_dict()
    opt2 = build_optimizer(tiny(), TrainConfig(optimizer="muon"))
    opt2.load_state_dict(sd)
    assert len(opt2.state) == len(opt.state)


def test_weight_decay_only_on_matrices():
    opt = build_optimizer(tiny(), TrainConfig(weight_decay=0.1))
    for g in opt.param_groups:
        assert all(p.dim() >= 2 for p in g["params"]) if g["weight_decay"] > 0 else \
            all(p.dim() < 2 for p in g["params"])


def test_schedules():
    c = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = lr_lambda(c)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1) and 0.1 < f(55) < 1.0
    w = lr_lambda(TrainConfig(steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0))
    assert w(50) == 1.0 and w(79) == 1.0 and w(90) == pytest.approx(0.5) and w(100) == pytest.approx(0.0)
    k = lr_lambda(TrainConfig(steps=100, warmup_steps=0, schedule="constant"))
    assert k(0) == k(99) == 1.0
    with pytest.raises(UserError, match="schedule"):
        lr_lambda(TrainConfig(schedule="linear"))


def test_resume_refuses_a_different_model(tmp_path):
    tr, _ = byte_corpus()
    cfg = TrainConfig(steps=2, batch_size=2, eval_every=0)
    train(tiny(), cfg, TokenLoader([tr], 2, 32), tmp_path, val_batches=None, meta={})
    other = GPT(ModelConfig(n_layer=1, n_head=2, n_kv_head=2, n_embd=48, seq_len=32, vocab_size=256))
    with pytest.raises(UserError, match=r"model config differs from this run.s \(changed: n_layer\)"):
        train(other, cfg, TokenLoader([tr], 2, 32), tmp_path, val_batches=None, meta={}, resume=True)
    with pytest.raises(UserError, match="no checkpoint"):
        train(tiny(), cfg, TokenLoader([tr], 2, 32), tmp_path / "new", val_batches=None, meta={}, resume=True)


def test_activation_checkpointing_gives_same_losses(tmp_path):
    tr, _ = byte_corpus()
    out = []
    for ac in (False, True):
        cfg = TrainConfig(steps=3, batch_size=4, eval_every=0, log_every=1, activation_checkpointing=ac)
        train(tiny(), cfg, TokenLoader([tr], 4, 32), tmp_path / str(ac), val_batches=None, meta={})
        out.append([r["loss"] for r in metrics(tmp_path / str(ac))])
    assert out[0] == pytest.approx(out[1], abs=1e-5)


def test_overfitting_warning(tmp_path):
    """A tiny train set memorised for many steps: val rises while train falls."""
    tr, va = byte_corpus()
    cfg = TrainConfig(steps=120, batch_size=8, lr=1e-2, warmup_steps=0, eval_every=15, log_every=5,
                      schedule="constant", weight_decay=0.0)
    logs: list[str] = []
    train(tiny(seq=16), cfg, TokenLoader([tr[:400]], 8, 16), tmp_path,
          val_batches=lambda: iter_eval_batches([va], 16, 16, max_batches=2), meta={}, log=logs.append)
    assert any("overfitting" in m for m in logs), [r for r in metrics(tmp_path) if r["kind"] == "val"]


def test_resume_refuses_another_tokenizer(tmp_path):
    tr, _ = byte_corpus()
    cfg = TrainConfig(steps=2, batch_size=2, eval_every=0)
    train(tiny(), cfg, TokenLoader([tr], 2, 32), tmp_path, val_batches=None, meta={"tokenizer_hash": "aaaa"})
    with pytest.raises(UserError, match="trained with tokenizer aaaa, this run's is bbbb"):
        train(tiny(), cfg, TokenLoader([tr], 2, 32), tmp_path, val_batches=None, meta={"tokenizer_hash": "bbbb"},
              resume=True)


def test_global_batch_tokens_sets_grad_accum_and_must_divide(tmp_path):
    cfg = TrainConfig(batch_size=4, global_batch_tokens=4096)
    assert resolve_grad_accum(cfg, 32, 1) == 32 and resolve_grad_accum(cfg, 32, 2) == 16
    assert resolve_grad_accum(TrainConfig(grad_accum=3), 32, 5) == 3  # unset: grad_accum as given
    with pytest.raises(UserError, match=r"global_batch_tokens=4096 is not a multiple of .* = 384; use 3840 or 4224"):
        resolve_grad_accum(cfg, 32, 3)
    tr, _ = byte_corpus()
    with pytest.raises(UserError, match="not a multiple"):  # refused before any step runs
        train(tiny(), TrainConfig(steps=1, batch_size=4, global_batch_tokens=4096), TokenLoader([tr], 4, 32),
              tmp_path / "w3", val_batches=None, meta={}, dist=DistInfo(world=3))
    assert not (tmp_path / "w3" / "metrics.jsonl").exists()
    res = train(tiny(), TrainConfig(steps=2, batch_size=4, global_batch_tokens=512, eval_every=0, log_every=1),
                TokenLoader([tr], 4, 32), tmp_path / "ok", val_batches=None, meta={})
    assert res["tokens"] == 2 * 512  # 4 micro-batches of 4 x 32 per step


def _write_shard(d: Path, tokens: np.ndarray, vocab: int) -> None:
    from chatforge.data.shards import pack_header

    d.mkdir(parents=True)
    with open(d / "shard_00000.bin", "wb") as f:
        f.write(pack_header(vocab, "0123456789abcdef", len(tokens), 1))
        f.write(tokens.astype("<u2").tobytes())
    np.save(d / "shard_00000.idx.npy", np.zeros(1, dtype=np.int64))


def test_shards_with_a_bigger_vocabulary_than_the_model_are_refused(tmp_path):
    tr, _ = byte_corpus()
    _write_shard(tmp_path / "shards", tr[:5000], vocab=300)
    loader = TokenLoader.from_dir(tmp_path / "shards", 2, 32)
    assert loader.vocab_size == 300
    with pytest.raises(UserError, match=r"shards in .*shards use a vocabulary of 300 but model.vocab_size is 256"):
        train(tiny(vocab=256), TrainConfig(steps=1, batch_size=2), loader, tmp_path / "a", val_batches=None, meta={})
    # No header to go by (plain arrays): the first batch with an id the model can't embed is refused.
    bad = tr[:5000].astype(np.int64) + 200  # printable bytes (32..126) now reach past 255
    with pytest.raises(UserError, match=r"token id \d+ but model.vocab_size is 256"):
        train(tiny(vocab=256), TrainConfig(steps=1, batch_size=2), TokenLoader([bad], 2, 32), tmp_path / "b",
              val_batches=None, meta={})


def test_early_stopping_keeps_the_best_checkpoint_and_logs_the_gap(tmp_path):
    """Validation on uniform noise: the best is the first evaluation, and learning the train text only
    makes it worse, so patience 2 stops two evaluations later."""
    tr, _ = byte_corpus()
    noise = np.random.default_rng(0).integers(0, 256, 4000).astype(np.uint16)
    cfg = TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup_steps=0, eval_every=2, log_every=1,
                      early_stop_patience=2, keep_last=1)
    logs: list[str] = []
    res = train(tiny(), cfg, TokenLoader([tr], 8, 32), tmp_path, val_batches=lambda: iter_eval_batches(
        [noise], 8, 32, max_batches=2), meta={}, log=logs.append)
    vals = [r for r in metrics(tmp_path) if r["kind"] == "val"]
    assert res["early_stopped"] and res["step"] == 6 and [r["step"] for r in vals] == [2, 4, 6]
    assert vals[0]["val_loss"] < vals[1]["val_loss"] and vals[0]["val_loss"] < vals[2]["val_loss"]
    assert all(r["gap"] == pytest.approx(r["val_loss"] - r["train_loss"]) for r in vals)
    best = json.loads((tmp_path / "ckpt" / "best.json").read_text())
    assert best["step"] == 2 and (tmp_path / "ckpt" / "step_000002").is_dir()  # saved when it improved
    assert json.loads((tmp_path / "ckpt" / "latest.json").read_text())["step"] == 6
    assert any("early stop at step 6" in m for m in logs)


def test_fixed_prompt_samples_are_logged_and_do_not_change_training(tmp_path):
    tr, va = byte_corpus()
    seen: list[tuple[int, bool]] = []

    def on_eval(model, step):
        seen.append((step, model.training))
        x = torch.tensor([[104, 105]])
        for _ in range(4):  # sampling draws from the global RNG, as generation does
            nxt = torch.multinomial(model(x)[0, -1].softmax(-1), 1)
            x = torch.cat([x, nxt[None]], dim=1)
        return [{"prompt": "hi", "text": bytes(x[0].tolist()).decode("latin-1")}]

    losses = []
    for sample in (True, False):
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=1, n_head=2, n_kv_head=2, n_embd=32, seq_len=32, vocab_size=256, dropout=0.2))
        cfg = TrainConfig(steps=6, batch_size=4, eval_every=2, log_every=1, sample_every_eval=sample)
        train(model, cfg, TokenLoader([tr], 4, 32), tmp_path / str(sample), on_eval=on_eval, meta={},
              val_batches=lambda: iter_eval_batches([va], 4, 32, max_batches=1))
        losses.append([r["loss"] for r in metrics(tmp_path / str(sample)) if r["kind"] == "train"])
    assert seen == [(2, False), (4, False), (6, False)]
    samples = [r for r in metrics(tmp_path / "True") if r["kind"] == "sample"]
    assert [(r["step"], r["prompt"]) for r in samples] == [(2, "hi"), (4, "hi"), (6, "hi")]
    assert all(r["text"].startswith("hi") and len(r["text"]) == 6 for r in samples)
    assert losses[0] == losses[1]  # dropout's RNG stream is untouched by sampling


def test_optional_trackers_skip_cleanly_or_log(tmp_path):
    import importlib.util

    tr, _ = byte_corpus()
    logs: list[str] = []
    cfg = TrainConfig(steps=2, batch_size=2, eval_every=0, log_every=1, tensorboard=True, wandb_project="cf-test")
    os.environ.setdefault("WANDB_MODE", "offline")
    res = train(tiny(), cfg, TokenLoader([tr], 2, 32), tmp_path, val_batches=None, meta={}, log=logs.append)
    assert res["step"] == 2
    has_tb = importlib.util.find_spec("tensorboard") is not None
    assert (tmp_path / "tensorboard").is_dir() == has_tb
    assert any("tensorboard package is not installed" in m for m in logs) != has_tb
    assert any("wandb is not installed" in m for m in logs) == (importlib.util.find_spec("wandb") is None)


def test_cpu_peak_keeps_the_best_rate_seen_here(tmp_path, monkeypatch):
    # A run started on a busy machine measures a low peak; the best one measured before is used instead.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _best_seen("fp32", 100e9) == 100e9
    assert _best_seen("fp32", 40e9) == 100e9
    assert _best_seen("fp32", 120e9) == 120e9
    assert _best_seen("bf16", 30e9) == 30e9  # each precision keeps its own peak
    (tmp_path / "chatforge" / "cpu_peak.json").write_text("not json")
    assert _best_seen("fp32", 50e9) == 50e9  # a damaged cache file is replaced, never an error


@pytest.mark.parametrize("packed", [False, True])
def test_loss_on_target_positions_only_equals_the_full_model(packed):
    """loss_sum runs the head only where y has targets, and the model only up to each row's last target:
    the same loss and gradients as the whole model on every position."""
    from chatforge.model import GPT
    from chatforge.train import IGNORE, loss_sum
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, seq_len=16, vocab_size=50, qk_norm=True))
    x = torch.randint(0, 50, (3, 16))
    y = torch.randint(0, 50, (3, 16))
    y[:, :5] = IGNORE
    y[0, 11:] = IGNORE  # tails after the last target: those positions are not computed
    y[2, 7:] = IGNORE
    y[1, 9] = IGNORE
    batch = {"x": x, "y": y}
    if packed:
        batch["doc_ids"] = torch.tensor([[0] * 6 + [1] * 10, [0] * 16, [0] * 3 + [1] * 13])
        batch["position_ids"] = torch.cat([torch.arange(6), torch.arange(10)]).expand(3, 16).clone()
    s, n = loss_sum(model, batch)
    s.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    kw = {k: v for k, v in batch.items() if k in ("doc_ids", "position_ids")}
    full = torch.nn.functional.cross_entropy(model(x, **kw).reshape(-1, 50), y.reshape(-1), ignore_index=IGNORE,
                                             reduction="sum")
    full.backward()
    assert n == int((y != IGNORE).sum())
    assert torch.allclose(s, full, atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_mfu_counts_four_flops_per_frozen_parameter():
    """LoRA trains adapters on a frozen base: no weight gradients there, so 4 (not 6) FLOPs per base weight."""
    from chatforge.lora import LoraSettings, add_lora
    from chatforge.train import train_flops_per_token
    model = tiny()
    full = train_flops_per_token(model)
    assert full == model.flops_per_token()
    lora = add_lora(tiny(), LoraSettings(rank=4))
    frozen = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert train_flops_per_token(lora) == full - 2 * frozen + 6 * adapters
    # Attention is counted over the context trained on (fine-tuning at a shorter seq_len than the model's).
    c = model.cfg
    assert train_flops_per_token(model, 16) == full - 12 * c.n_layer * c.n_embd * (c.seq_len - 16)


def test_loop_state_keeps_the_checkpoint_format():
    """The loop state is saved as the same plain dict as before it was a dataclass: old checkpoints resume."""
    from dataclasses import asdict

    from chatforge.train import LoopState

    old = {"step": 7, "tokens": 896, "seconds": 1.5, "skipped": 1, "bad_in_row": 0, "log_loss_sum": 2.25,
           "log_loss_n": 1, "log_tokens": 128, "log_seconds": 0.2, "train_loss": 2.5, "best_val": 2.4,
           "final_val": 2.6, "val_hist": [2.4, 2.6], "train_hist": [2.7, 2.5], "evals_since_best": 1,
           "early_stopped": False}
    assert asdict(LoopState.from_dict(old)) == {**old, "precision": ""}  # an old checkpoint: decided on resume
    assert set(asdict(LoopState())) == set(old) | {"precision"}


def test_bf16_ratio_is_the_median_of_recent_probes(tmp_path, monkeypatch):
    # The printed bf16/fp32 ratio is one that probes measured (the median of the last 5), not a ratio of two
    # best-ever rates taken under different loads.
    from chatforge.machine import _recent_median
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _recent_median("r", 2.0) == 2.0
    assert _recent_median("r", 10.0) == 6.0
    assert _recent_median("r", 3.0) == 3.0
    for v in (4.0, 4.0, 4.0):
        _recent_median("r", v)
    assert _recent_median("r", 4.0) == 4.0  # 2.0 and 10.0 have dropped out of the last 5
    assert _recent_median("other", 1.5) == 1.5
    (tmp_path / "chatforge" / "cpu_peak.json").write_text("[]")
    assert _recent_median("r", 2.5) == 2.5  # a damaged cache is replaced, never an error
