"""Report card: plots are real PNGs, tables carry values with standard errors, report.md/html are written."""
import json
import math

import numpy as np
from PIL import Image
from rich.console import Console

from chatforge.report import compare_runs, format_table, plot_loss_curves, print_table, read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, steps=50, start=5.0, scale=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(1, steps + 1):
        loss = start * scale * math.exp(-s / 20) + 1.0
        lines.append({"kind": "train", "step": s, "loss": loss, "lr": 1e-3, "tokens": s * 1000,
                      "tok_per_s": 1e4, "mfu": 0.1, "time": s * 0.1})
        if s % 10 == 0:
            lines.append({"kind": "val", "step": s, "val_loss": loss + 0.1, "train_loss": loss})
    lines.append({"kind": "sample", "step": steps, "prompt": "Once", "text": "Once upon a time"})
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"kind\": \"train\", \"st")  # torn last line
    return path


def is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 1000 and data[12:16] == b"IHDR"


CURVE_COLORS = {"C0": (31, 119, 180), "C1": (255, 127, 14)}  # matplotlib's first two line colours


def curve_pixels(path) -> dict[str, int]:
    """Pixels of each curve colour in a loss plot (8 x 4.5 in at 110 dpi): what was actually drawn."""
    assert is_png(path)
    with Image.open(path) as im:
        assert im.size == (880, 495), im.size
        rgb = np.asarray(im.convert("RGB")).astype(int)
    return {name: int((np.abs(rgb - c).sum(-1) < 40).sum()) for name, c in CURVE_COLORS.items()}


def test_read_metrics_skips_torn_line(tmp_path):
    recs = read_metrics(write_metrics(tmp_path / "m.jsonl", steps=20))
    assert sum(r["kind"] == "train" for r in recs) == 20 and sum(r["kind"] == "val" for r in recs) == 2


def test_plot_and_compare(tmp_path):
    a = write_metrics(tmp_path / "a" / "pretrain" / "metrics.jsonl")
    write_metrics(tmp_path / "b" / "pretrain" / "metrics.jsonl", scale=1.3)
    out = plot_loss_curves({"a": a}, tmp_path / "loss.png", log_y=True)
    px = curve_pixels(out)
    assert px["C0"] > 500 and px["C1"] == 0, px  # one run: its curves, in the first colour only
    cmp = compare_runs(tmp_path / "a", tmp_path / "b", tmp_path / "cmp.png")
    px = curve_pixels(cmp)
    assert px["C0"] > 500 and px["C1"] > 500, px  # both runs drawn
    empty = plot_loss_curves({"none": tmp_path / "missing.jsonl"}, tmp_path / "empty.png")
    assert curve_pixels(empty) == {"C0": 0, "C1": 0}  # nothing to draw: no curve, but still a valid PNG


def test_format_table_with_standard_errors():
    rows = [{"model": "base", "split": "val", "loss": 2.5, "loss_se": 0.0123, "ppl": math.exp(2.5), "tokens": 12345},
            {"model": "sft", "split": "val", "loss": 2.1, "ppl": math.exp(2.1), "acc": 0.4, "acc_se": float("nan")}]
    md = format_table(rows, ["model", "split", "loss", "ppl", "acc", "bpb", "tokens"])
    lines = md.splitlines()
    assert lines[0] == "| model | split | loss | ppl | acc | tokens |"  # bpb is in no row: dropped
    assert lines[2] == "| base | val | 2.5000 ± 0.0123 | 12.18 |  | 12,345 |"
    assert lines[3] == "| sft | val | 2.1000 | 8.1662 | 0.4000 |  |"  # NaN se is left out


def test_print_table_renders():
    console = Console(record=True, width=120)
    print_table([{"model": "base", "loss": 2.0, "loss_se": 0.1}], ["model", "loss"], title="Eval", console=console)
    text = console.export_text()
    assert "Eval" in text and "2.0000 ± 0.1000" in text


def test_print_table_piped_is_not_squeezed(capsys):
    """Piped or redirected (no terminal), the table keeps every cell whole instead of fitting 80 columns."""
    row = {"model": "import/step_000000", "task": "hellaswag_val_sample1000_raw.jsonl",
           "source": "../shared/data/hellaswag/hellaswag_val_sample1000_raw.jsonl",
           **{f"metric_{i}": 0.25 + i for i in range(8)}}
    print_table([row], title="eval")
    out = capsys.readouterr().out
    assert all(str(v) in out for v in row.values() if isinstance(v, str)) and "0.2500" in out and "7.2500" in out


def test_report_notes_say_only_what_was_measured(tmp_path):
    """finetune.eval_sampled=false leaves the sampled end-of-turn share unmeasured: the note must not say 0%."""
    from chatforge.config import load_config
    from chatforge.demo import report
    from chatforge.paths import RunPaths
    paths = RunPaths(tmp_path / "run")
    paths.finetune.mkdir(parents=True)
    side = {"prompts": 40, "end_of_turn_share": None}
    (paths.finetune / "finetune_eval.json").write_text(json.dumps(
        {"mode": "sft", "lora": {"rank": 16}, "max_new_tokens": 64, "before": {**side, "end_of_turn_share_greedy": 0.0},
         "after": {**side, "end_of_turn_share_greedy": 1.0}}))
    md = report(load_config("tiny", []), paths).read_text()
    note = next(line for line in md.splitlines() if "end-of-turn" in line)
    assert note.endswith("greedy: 0% before, 100% after") and "sampled" not in note, note


def test_write_report(tmp_path):
    run = tmp_path / "run"
    write_metrics(run / "pretrain" / "metrics.jsonl")
    write_metrics(run / "finetune" / "metrics.jsonl", steps=20, start=2.0)
    (run / "data").mkdir(parents=True)
    (run / "data" / "manifest.json").write_text(json.dumps({"train": {"docs": 900, "bytes": 123456},
                                                            "val": {"docs": 100}}))
    sections = {
        "config": {"model": {"n_layer": 2, "n_embd": 64}, "train": {"steps": 50}},
        "tokenizer": {"kind": "bpe", "vocab_size": 512, "bytes_per_token": 3.1},
        "evals": [{"model": "base", "split": "pretrain val", "loss": 2.5, "loss_se": 0.01, "ppl": 12.18,
                   "acc": 0.3, "acc_se": 0.004, "top5": 0.6, "top5_se": 0.005, "bpb": 1.1, "tokens": 5000},
                  {"model": "sft", "split": "sft val", "loss": 1.9, "loss_se": 0.02, "ppl": 6.69}],
        "benchmarks": [{"model": "base", "task": "hellaswag", "acc": 0.26, "acc_se": 0.014, "acc_norm": 0.27,
                        "random_baseline": 0.25, "n": 1000, "predictions": [{"pred": 0}]}],
        "answers": [{"question": "What is 2+2?", "answer": "4\nfour"}],
        "notes": ["tiny run"],
    }
    md_path = write_report(run, sections)
    md = md_path.read_text()
    assert md_path == run / "report.md"
    assert "| model | split | loss | ppl | acc | top5 | bpb | tokens |" in md
    assert "| base | pretrain val | 2.5000 ± 0.0100 | 12.18 | 0.3000 ± 0.0040 | 0.6000 ± 0.0050 | 1.1000 | 5,000 |" in md
    assert "| base | hellaswag | 0.2600 ± 0.0140 | 0.2700 | 0.2500 | 1,000 |" in md  # no exact_match column
    assert "| train.docs | 900 |" in md  # data stats from the manifest
    assert "| model.n_layer | 2 |" in md and "| vocab_size | 512 |" in md
    assert "**Q:** What is 2+2?" in md and "> 4\n> four" in md
    for stage in ("pretrain", "finetune"):
        assert f"]({stage}/loss.png)" in md
        assert curve_pixels(run / stage / "loss.png")["C0"] > 500  # the stage's curves are drawn
    html = (run / "report.html").read_text()
    assert html.startswith("<!doctype html>") and 'src="pretrain/loss.png"' in html and "2+2" in html


def test_table_drops_list_columns_and_shown_se_columns():
    rows = [{"model": "m", "task": "hellaswag", "acc": 0.5, "acc_se": 0.1, "n": 4, "predictions": [{"pred": 1}]},
            {"model": "m", "task": "gsm8k", "exact_match": 0.25, "se": 0.05, "n": 4, "samples": [{"reply": "x"}]}]
    md = format_table(rows, sorted({k for r in rows for k in r}))  # what a CLI passing every key does
    header = md.splitlines()[0]
    assert header == "| acc | exact_match | model | n | task |"
    assert "0.5000 ± 0.1000" in md and "0.2500 ± 0.0500" in md


def test_relative_plot_paths_are_inside_the_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    plot_loss_curves({"a": write_metrics(run / "pretrain" / "metrics.jsonl")}, run / "loss.png")
    monkeypatch.chdir(tmp_path)  # the working directory is not the run
    md = write_report(run, {"plots": ["loss.png"]}).read_text()
    assert "](loss.png)" in md
