"""Every stage on the tiny preset, asserting outcomes (not just that it ran)."""
import json
import math

import numpy as np
import torch

from chatforge.checkpoint import load_model, resolve_checkpoint
from chatforge.data.loader import iter_eval_batches
from chatforge.data.shards import open_shards
from chatforge.engine import Engine
from chatforge.evaluate import evaluate_lm
from chatforge.tokenizer import Tokenizer


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_directory_has_every_artifact(tiny_run):
    for rel in ["config.yaml", "data/manifest.json", "data/sft_train.jsonl", "data/sft_val.jsonl",
                "tokenizer/tokenizer.json", "tokens/train", "tokens/val", "pretrain/metrics.jsonl",
                "pretrain/loss.png", "finetune/metrics.jsonl", "loss.png", "report.md"]:
        assert (tiny_run / rel).exists(), rel
    assert (tiny_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tiny_run / "report.md").read_text()
    assert "fine-tuned" in report and "base" in report


def test_pretraining_beats_unigram_entropy(tiny_run):
    tok = Tokenizer.load(tiny_run / "tokenizer")
    val = np.concatenate([np.asarray(s.tokens) for s in open_shards(tiny_run / "tokens" / "val")])
    counts = np.bincount(val, minlength=tok.vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())  # nats/token of the best bag-of-tokens model
    rows = json.loads((tiny_run / "eval" / "demo.json").read_text())
    base = next(r for r in rows if r["model"] == "base" and r["split"] == "text val")
    assert base["loss"] < unigram_entropy - 0.3, (base["loss"], unigram_entropy)


def test_checkpoint_reloads_to_the_logged_validation_loss(tiny_run):
    # The loop logged the final validation loss with the in-memory model; the reloaded weights must give
    # exactly that number on the same batches.
    from chatforge.config import load_config
    cfg = load_config(str(tiny_run / "config.yaml"))
    tok = Tokenizer.load(tiny_run / "tokenizer")
    model, meta = load_model(resolve_checkpoint(tiny_run / "pretrain" / "ckpt", "last"))
    val = [s.tokens for s in open_shards(tiny_run / "tokens" / "val")]
    batches = iter_eval_batches(val, cfg.eval.batch_size, cfg.model.seq_len, max_batches=cfg.train.eval_batches)
    got = evaluate_lm(model, batches)["loss"]
    logged = [m for m in _metrics(tiny_run / "pretrain" / "metrics.jsonl") if m["kind"] == "val"][-1]["val_loss"]
    assert math.isclose(got, logged, rel_tol=1e-5), (got, logged)
    again, _ = load_model(resolve_checkpoint(tiny_run / "pretrain" / "ckpt", "last"))
    x = torch.from_numpy(np.asarray(val[0][:64], dtype=np.int64))[None]
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_finetuning_lowers_chat_validation_loss(tiny_run):
    rows = json.loads((tiny_run / "eval" / "demo.json").read_text())
    before = next(r for r in rows if r["model"] == "base" and r["split"] == "chat val")["loss"]
    after = next(r for r in rows if r["model"] == "fine-tuned" and r["split"] == "chat val")["loss"]
    assert after < before - 0.2, (before, after)


def test_chat_reply_ends_at_end_of_turn(tiny_run):
    tok = Tokenizer.load(tiny_run / "tokenizer")
    model, _ = load_model(resolve_checkpoint(tiny_run / "finetune" / "ckpt", "best"))
    engine = Engine(model, tok)
    ids = tok.render_chat([{"role": "user", "content": "What does json.dumps do?"}], add_generation_prompt=True)[0]
    out = engine.generate(ids, max_new_tokens=200, temperature=0.0, stop_ids=(tok.end_id,))[0]
    assert out[-1] == tok.end_id, tok.decode(out)
    assert tok.decode(out[:-1]).strip()
