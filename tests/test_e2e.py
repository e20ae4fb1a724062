"""Every stage on the tiny preset, asserting outcomes (not just that it ran)."""
import json
import math

import numpy as np
import torch
from PIL import Image

from chatforge.checkpoint import load_model, resolve_checkpoint
from chatforge.data.loader import iter_eval_batches
from chatforge.data.shards import open_shards
from chatforge.engine import Engine
from chatforge.evaluate import evaluate_lm
from chatforge.tokenizer import Tokenizer


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _curve_pixels(png) -> dict[str, int]:
    """Pixels of matplotlib's first two line colours in a loss plot (8 x 4.5 in at 110 dpi)."""
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (880, 495), (png, im.size)
        rgb = np.asarray(im.convert("RGB")).astype(int)
    return {name: int((np.abs(rgb - c).sum(-1) < 40).sum()) for name, c in (("C0", (31, 119, 180)),
                                                                             ("C1", (255, 127, 14)))}


def test_run_directory_has_every_artifact(tiny_run):
    for rel in ["config.yaml", "data/manifest.json", "data/sft_train.jsonl", "data/sft_val.jsonl",
                "tokenizer/tokenizer.json", "tokens/train", "tokens/val", "pretrain/metrics.jsonl",
                "pretrain/loss.png", "finetune/metrics.jsonl", "loss.png", "report.md"]:
        assert (tiny_run / rel).exists(), rel
    # The artifacts agree with each other: documents prepared -> documents encoded -> tokens in the shards.
    manifest = json.loads((tiny_run / "data" / "manifest.json").read_text())
    stats = json.loads((tiny_run / "tokens" / "stats.json").read_text())
    tok = Tokenizer.load(tiny_run / "tokenizer")
    for split in ("train", "val"):
        shards = open_shards(tiny_run / "tokens" / split, tok_hash=tok.hash)
        assert stats[split]["docs"] == manifest["splits"][split]["documents"] == sum(len(s.doc_starts) for s in shards)
        assert stats[split]["tokens"] == sum(len(s.tokens) for s in shards)
    sft = json.loads((tiny_run / "data" / "sft_manifest.json").read_text())
    for split in ("train", "val"):
        assert len((tiny_run / "data" / f"sft_{split}.jsonl").read_text().splitlines()) == sft["counts"][split]
    # Both stages learned: the last logged validation loss is below the first.
    for stage in ("pretrain", "finetune"):
        val = [m["val_loss"] for m in _metrics(tiny_run / stage / "metrics.jsonl") if m["kind"] == "val"]
        assert len(val) >= 2 and val[-1] < val[0], (stage, val)
        assert _curve_pixels(tiny_run / stage / "loss.png")["C0"] > 500  # the stage's curves are drawn
    px = _curve_pixels(tiny_run / "loss.png")  # both stages in one plot
    assert px["C0"] > 500 and px["C1"] > 500, px
    # The report carries the evaluation table's numbers, for the base and the fine-tuned model.
    report = (tiny_run / "report.md").read_text()
    rows = json.loads((tiny_run / "eval" / "demo.json").read_text())
    assert {r["model"] for r in rows} == {"base", "fine-tuned"}
    for r in rows:
        assert f"| {r['model']} | {r['split']} | {r['loss']:.4f} ± {r['loss_se']:.4f} |" in report, r


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
    assert meta["tokenizer_hash"] == tok.hash
    val = [s.tokens for s in open_shards(tiny_run / "tokens" / "val", tok_hash=tok.hash)]
    batches = iter_eval_batches(val, cfg.eval.batch_size, cfg.model.seq_len, max_batches=cfg.train.eval_batches)
    assert meta["precision"] in ("fp32", "bf16")
    got = evaluate_lm(model, batches, precision=meta["precision"])["loss"]  # as the loop measured it
    logged = [m for m in _metrics(tiny_run / "pretrain" / "metrics.jsonl") if m["kind"] == "val"][-1]["val_loss"]
    assert math.isclose(got, logged, rel_tol=1e-5), (got, logged)
    # (A checkpoint compared with itself loaded twice proves nothing; the logged loss above is the check.)


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
    reply = tok.decode(out[:-1])
    assert reply.strip() and not set(out[:-1]) & set(tok.stop_ids)
    # `chat` gives the same reply: it stops at the same token and shows everything before it.
    assert engine.chat([{"role": "user", "content": "What does json.dumps do?"}], max_new_tokens=200,
                       temperature=0.0) == reply


def _cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "chatforge", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_eval_cli_on_a_file_and_a_benchmark(tiny_run, tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("import os\n\ndef main():\n    return os.getcwd()\n" * 20)
    r = _cli("eval", tiny_run, "--stage", "pretrain", "--file", text, "--stride", "64")
    assert r.returncode == 0, r.stderr
    assert "doc.txt" in r.stdout
    rows = json.loads((tiny_run / "eval" / "pretrain_best_file.json").read_text())
    # The same numbers as scoring the file with the pretrained checkpoint here: windows of up to seq_len
    # tokens moving 64 at a time, every token after the first scored once, with the most context it can have.
    tok = Tokenizer.load(tiny_run / "tokenizer")
    model, _ = load_model(resolve_checkpoint(tiny_run / "pretrain" / "ckpt", "best"))
    ids, seq_len = tok.encode(text.read_text()), model.cfg.seq_len
    assert len(ids) > seq_len + 64  # several windows: the stride matters
    nll, scored, start, done = 0.0, 0, 0, 1
    while done < len(ids):
        end = min(start + seq_len + 1, len(ids))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[start:end - 1]]))[0].double(), -1)
        for t in range(done, end):
            nll, scored = nll - logp[t - start - 1, ids[t]].item(), scored + 1
        done, start = end, start + 64
    assert rows[0]["tokens"] == scored == len(ids) - 1
    assert math.isclose(rows[0]["loss"], nll / scored, rel_tol=1e-5), (rows[0]["loss"], nll / scored)
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"ctx": "def f(x):\n    return", "endings": [" x", " ))))((((", " ]]]]"],
                                        "label": 0}) for _ in range(3)) + "\n")
    r = _cli("eval", tiny_run, "--task", mc, "--schema", "hellaswag")
    assert r.returncode == 0, r.stderr
    bench = json.loads((tiny_run / "eval" / "finetune_best_tasks.json").read_text())
    assert bench[0]["n"] == 3 and bench[0]["random_baseline"] == 1 / 3
    assert _cli("report", tiny_run).returncode == 0
    report = (tiny_run / "report.md").read_text()
    assert "## Benchmarks" in report and "## Answers to held-out questions" in report
    frow = json.loads((tiny_run / "eval" / "pretrain_best_file.json").read_text())[0]  # `eval --file`'s row too
    assert f"| {frow['model']} | {frow['split']} | {frow['loss']:.4f}" in report
    # bad input: one line, exit 2
    for args, needle in [(("--file", tmp_path / "missing.txt"), "missing.txt"),
                         (("--checkpoint", "step_9999"), "step_9999"),
                         (("--task", text, "--schema", "arc"), "line 1")]:
        r = _cli("eval", tiny_run, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and needle in r.stderr, (args, r.stderr)


def test_generate_export_and_embeddings(tiny_run, tmp_path):
    r = _cli("generate", tiny_run, "--stage", "pretrain", "--prompt", "def ", "generate.max_new_tokens=16")
    assert r.returncode == 0, r.stderr
    # The prompt, then the pretrained model's continuation with the run's generate settings (seeded).
    from chatforge.config import load_config
    g = load_config(str(tiny_run / "config.yaml")).generate
    tok = Tokenizer.load(tiny_run / "tokenizer")
    eng = Engine(load_model(resolve_checkpoint(tiny_run / "pretrain" / "ckpt", "best"))[0], tok)
    cont = eng.stream(eng.complete_prompt("def "), max_new_tokens=16, temperature=g.temperature, top_k=g.top_k,
                      top_p=g.top_p, repetition_penalty=g.repetition_penalty, seed=g.seed)
    assert r.stdout == "def " + "".join(cont) + "\n", r.stdout
    assert cont.n_tokens == 16
    out = tmp_path / "hf"
    r = _cli("export", tiny_run, out)
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    model, _ = load_model(resolve_checkpoint(tiny_run / "finetune" / "ckpt", "best"))
    x = torch.tensor([[0, 5, 17, 99, 300, 12]])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-4)
    r = _cli("export", tiny_run, out)  # never overwritten without --force
    assert r.returncode == 2 and "--force" in r.stderr
    png = tmp_path / "emb.png"
    r = _cli("embeddings", tiny_run, "--near", "def", "--plot", png)
    assert r.returncode == 0, r.stderr
    neighbours = [l for l in r.stdout.splitlines() if l[:1] in "+-" and "'" in l]
    assert len(neighbours) == 10, r.stdout
    with Image.open(png) as im:  # a real scatter plot: large, with the points drawn (translucent blue)
        assert im.format == "PNG" and min(im.size) > 1000, im.size
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert int(((rgb[..., 2] - rgb[..., 0]) > 40).sum()) > 300
