"""Precision chosen by measurement: bf16 autocast where the CPU/GPU has bf16 units that measure faster, fp32
elsewhere; explicit settings win; quality holds; resume stays bit-exact within a precision; weights stay fp32."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from chatforge import machine
from chatforge.config import TrainConfig
from chatforge.data.loader import TokenLoader, iter_eval_batches
from chatforge.errors import UserError
from chatforge.train import train
from test_train import byte_corpus, metrics, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def test_auto_follows_the_cpu_flags_and_the_measured_speed(monkeypatch):
    assert machine.choose_precision(CPU, "fp32")[0] == "fp32" and machine.choose_precision(CPU, "bf16")[0] == "bf16"
    with pytest.raises(UserError, match="precision 'fp16' is not known"):
        machine.choose_precision(CPU, "fp16")
    monkeypatch.setattr(machine, "cpu", lambda: ("Some CPU", ["avx2", "fma"]))
    assert machine.choose_precision(CPU, "auto") == ("fp32", "fp32: the CPU has no bf16 units (no AMX or avx512_bf16)")
    monkeypatch.setattr(machine, "cpu", lambda: ("Xeon", ["avx512_bf16", "amx_bf16", "amx_tile"]))
    monkeypatch.setattr(machine, "bf16_speedup", lambda: 3.8)
    assert machine.choose_precision(CPU, "auto") == ("bf16", "bf16 autocast: AMX present, matmul 3.8x fp32")
    monkeypatch.setattr(machine, "bf16_speedup", lambda: 0.33)  # units, but slower than fp32 here
    assert machine.choose_precision(CPU, "auto")[0] == "fp32"


def _run(tmp_path, precision: str, steps: int = 40, **kw):
    tr, va = byte_corpus()
    cfg = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=0, log_every=5,
                      eval_batches=4, precision=precision, **kw)
    logs = []
    res = train(tiny(), cfg, TokenLoader([tr], 8, 32), tmp_path, meta={}, log=logs.append,
                val_batches=lambda: iter_eval_batches([va], 8, 32, max_batches=4))
    return res, logs


def test_bf16_autocast_reaches_the_fp32_loss_and_keeps_fp32_weights(tmp_path):
    fp32, logs32 = _run(tmp_path / "fp32", "fp32")
    bf16, logs16 = _run(tmp_path / "bf16", "bf16")
    assert "precision: fp32 (asked for)" in logs32 and "precision: bf16 autocast (asked for)" in logs16
    first = metrics(tmp_path / "bf16")[0]["loss"]
    assert bf16["final_val_loss"] < first - 1.0  # it learned
    assert bf16["final_val_loss"] == pytest.approx(fp32["final_val_loss"], abs=0.05)  # within noise of fp32
    ckpt = next((tmp_path / "bf16" / "ckpt").glob("step_*"))
    assert {t.dtype for t in load_file(str(ckpt / "model.safetensors")).values()} == {torch.float32}


def test_bf16_resume_is_bit_exact(tmp_path):
    _run(tmp_path / "full", "bf16", steps=8, ckpt_every=4, keep_last=5)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "ckpt" / "step_000008")
    for link in (part / "ckpt").iterdir():  # "best"/"last" pointers, if any, must not name the removed step
        if link.is_symlink():
            link.unlink()
    tr, va = byte_corpus()
    cfg = TrainConfig(steps=8, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=0, log_every=5, eval_batches=4,
                      precision="fp32", ckpt_every=4, keep_last=5)  # asks for fp32: the run's bf16 is kept
    logs = []
    train(tiny(), cfg, TokenLoader([tr], 8, 32), part, meta={}, log=logs.append, resume=True,
          val_batches=lambda: iter_eval_batches([va], 8, 32, max_batches=4))
    assert "precision: bf16 (as the run being resumed)" in logs
    a = load_file(str(tmp_path / "full" / "ckpt" / "step_000008" / "model.safetensors"))
    b = load_file(str(part / "ckpt" / "step_000008" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- generation: bf16 autocast in prefill only ------------------------------------------------------------

def _engine_and_prompt(precision: str = "fp32", T: int = 40):
    from test_engine import make_model, make_tok

    from chatforge.engine import Engine
    tok = make_tok()
    model = make_model(tok)
    ids = torch.randint(3, tok.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    return Engine(model, tok, precision=precision), model, ids


def _fp32_logits(model, ids):
    """What Engine.prefill computed before it had a precision."""
    last = torch.zeros(ids.shape, dtype=torch.bool)
    last[:, -1] = True
    with torch.inference_mode():
        return model(ids, logits_at=last)


def test_fp32_generation_is_unchanged_and_bf16_prefill_is_close_but_not_equal():
    eng, model, ids = _engine_and_prompt("fp32")
    ref = _fp32_logits(model, ids)
    fp32 = eng.prefill(ids, eng.new_cache(2, ids.shape[1]))
    assert eng.precision == "fp32" and torch.equal(fp32, ref)
    from chatforge.engine import Engine
    default = Engine(model, eng.tok)  # the default is fp32: every caller but generate/chat/serve keeps it
    prompt = ids[0, :12].tolist()
    assert eng.generate(prompt, max_new_tokens=12, temperature=0) == \
        default.generate(prompt, max_new_tokens=12, temperature=0)

    bf16 = Engine(model, eng.tok, precision="bf16")
    cache = bf16.new_cache(2, ids.shape[1])
    got = bf16.prefill(ids, cache)
    assert bf16.precision == "bf16" and got.dtype == torch.float32 and cache.kv[0].dtype == torch.float32
    assert not torch.equal(got, ref)  # the bf16 path really ran
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 keeps ~3 significant digits
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # autocast: the weights stay fp32
    assert len(bf16.generate(prompt, max_new_tokens=6, temperature=0)[0]) == 6  # decode steps after it run


def test_generate_precision_auto_follows_the_machine_and_short_prompts_stay_fp32(monkeypatch):
    monkeypatch.setattr(machine, "cpu", lambda: ("Some CPU", ["avx2", "fma"]))
    assert _engine_and_prompt("auto")[0].precision == "fp32"
    monkeypatch.setattr(machine, "cpu", lambda: ("Xeon", ["avx512_bf16", "amx_bf16", "amx_tile"]))
    monkeypatch.setattr(machine, "bf16_speedup_at", lambda width: 3.0)
    from chatforge.engine import BF16_MIN_TOKENS
    eng, model, ids = _engine_and_prompt("auto", T=BF16_MIN_TOKENS // 2)
    assert eng.precision == "bf16" and eng.precision_why.startswith("bf16 autocast: AMX present")
    short = eng.prefill(ids[:1], None)  # below BF16_MIN_TOKENS: the casts would cost more than they save
    assert torch.equal(short, _fp32_logits(model, ids[:1]))
    assert not torch.equal(eng.prefill(ids, None), _fp32_logits(model, ids))  # 2 rows: BF16_MIN_TOKENS tokens


def test_an_unknown_generate_precision_is_a_one_line_error(tmp_path, capsys):
    from chatforge.cli import main
    from chatforge.config import load_config
    with pytest.raises(UserError, match="'generate.precision': 'fp16' is not one of auto, fp32, bf16"):
        load_config("tiny", ["generate.precision=fp16"])
    assert main(["generate", str(tmp_path / "run"), "--prompt", "x", "generate.precision=fp16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'generate.precision': 'fp16' is not one of auto, fp32, bf16" in err
