"""Bad input at the command line: one line naming the problem, exit 2, no traceback, nothing overwritten."""
import subprocess
import sys

import pytest

from chatforge.config import load_config
from chatforge.errors import UserError


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "chatforge", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    # Warnings (e.g. "empty file, skipped") may come first; the error itself is exactly one line.
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def test_every_subcommand_has_help():
    for cmd in ["prepare", "tokenizer", "encode", "pretrain", "eval", "finetune", "generate", "chat", "serve",
                "export", "demo", "report", "embeddings"]:
        r = cli(cmd, "--help")
        assert r.returncode == 0 and "--config" in r.stdout and "--run-dir" in r.stdout, cmd


def test_missing_input_path(tmp_path):
    r = cli("prepare", "--config", "tiny", "--run-dir", str(tmp_path / "run"), "--input", str(tmp_path / "nope.txt"))
    assert_user_error(r, "nope.txt")


def test_corpus_with_no_usable_text(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("hi\n")
    r = cli("prepare", "--config", "tiny", "--run-dir", str(tmp_path / "run"), "--input", str(tmp_path / "*.txt"))
    assert_user_error(r, "no usable text")


def test_unknown_config_key(tmp_path):
    r = cli("prepare", "--config", "tiny", "--run-dir", str(tmp_path / "run"), "train.stepz=3")
    assert_user_error(r, "train.stepz", "steps")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layers: 3\n")
    r = cli("prepare", "--config", str(bad), "--run-dir", str(tmp_path / "run"))
    assert_user_error(r, "model.n_layers")


def test_missing_config_file(tmp_path):
    r = cli("prepare", "--config", str(tmp_path / "nope.yaml"))
    assert_user_error(r, "nope.yaml")


def test_stage_before_its_inputs(tmp_path):
    r = cli("tokenizer", "--config", "tiny", "--run-dir", str(tmp_path / "run"))
    assert_user_error(r, "chatforge prepare")
    r = cli("pretrain", "--config", "tiny", "--run-dir", str(tmp_path / "run"))
    assert_user_error(r)


def test_serve_max_batch_must_be_positive(tmp_path):
    r = cli("serve", "--config", "tiny", "--run-dir", str(tmp_path / "run"), "--max-batch", "0")
    assert_user_error(r, "--max-batch")


def test_existing_run_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    keep = run / "data" / "manifest.json"
    keep.write_text("{}")
    r = cli("prepare", "--config", "tiny", "--run-dir", str(run))
    assert_user_error(r, "--force")
    assert keep.read_text() == "{}"
    r = cli("demo", "--config", "tiny", "--run-dir", str(run))
    assert_user_error(r, "--force")
    assert keep.read_text() == "{}"


def test_config_overrides_and_types():
    cfg = load_config("tiny", ["train.steps=7", "model.qk_norm=true", "train.lr=1e-4", "data.inputs=a.txt,b.txt"])
    assert cfg.train.steps == 7 and cfg.model.qk_norm is True and cfg.train.lr == 1e-4
    assert cfg.data.inputs == ["a.txt", "b.txt"]
    with pytest.raises(UserError, match="train.steps"):
        load_config("tiny", ["train.steps=many"])
    with pytest.raises(UserError, match="key.sub=value"):
        load_config("tiny", ["train.steps"])


def test_overrides_after_a_list_option_are_overrides(tmp_path):
    """`prepare --input DIR data.max_docs=3`: the override is applied, not read as an input path."""
    import json
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(8):
        (d / f"{i}.txt").write_text(f"Document number {i} has enough words to be kept by the filters.\n" * 3)
    run = tmp_path / "run"
    r = cli("prepare", "--config", "tiny", "--run-dir", str(run), "--input", str(d), "data.max_docs=3",
            "data.min_chars=8")
    assert r.returncode == 0, r.stderr
    m = json.loads((run / "data" / "manifest.json").read_text())
    assert sum(s["documents"] for s in m["splits"].values()) == 3
    assert "max_docs: 3" in (run / "config.yaml").read_text()


def test_one_record_without_the_text_field_is_rejected_not_fatal(tmp_path):
    import json
    f = tmp_path / "docs.jsonl"
    recs = [{"text": f"Document number {i} has enough words to be kept by the filters."} for i in range(10)]
    recs.insert(4, {"body": "no text field here"})
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = cli("prepare", "--config", "tiny", "--run-dir", str(tmp_path / "run"), "--input", str(f), "data.min_chars=8")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert sum(s["documents"] for s in m["splits"].values()) == 10 and m["read_errors"]["missing_field"] == 1
    rej = json.loads((tmp_path / "run" / "data" / "rejects.jsonl").read_text().splitlines()[0])
    assert rej["where"] == f"{f}:5" and rej["reason"] == "missing_field"
    r = cli("prepare", "--config", "tiny", "--run-dir", str(tmp_path / "run2"), "--input", str(f), "--strict")
    assert_user_error(r, f"{f}:5", "no field 'text'")


def test_demo_with_a_missing_pretrained_model_stops_before_training(tmp_path):
    r = cli("demo", "--config", "tiny", "--run-dir", str(tmp_path / "run"), "demo.pretrained=nope.gguf")
    assert_user_error(r, "demo.pretrained='nope.gguf'")
    assert not (tmp_path / "run").exists()
