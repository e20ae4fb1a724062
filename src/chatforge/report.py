"""The report card: loss-curve plots, metric tables (markdown and console), report.md + report.html.

Everything here takes plain dicts and paths, so the CLI passes whatever it has; missing sections are left
out rather than failing the report. Plots use matplotlib's Agg canvas directly (no pyplot global state,
no display needed).
"""
from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

# Metric columns of the eval table; each shows "value ± se" when the row has "<name>_se".
EVAL_COLUMNS = ["model", "split", "loss", "ppl", "acc", "top5", "bpb", "tokens"]
BENCH_COLUMNS = ["model", "task", "metric", "score", "centered", "acc", "acc_norm", "exact_match", "random_baseline", "n"]


def plot_stage(stage_dir: Path) -> None:
    """STAGE/loss.png from STAGE/metrics.jsonl."""
    plot_loss_curves({stage_dir.name: stage_dir / "metrics.jsonl"}, stage_dir / "loss.png",
                     title=f"{stage_dir.name} loss")

def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl; a torn last line (run killed mid-write) is skipped."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _smooth(values: Sequence[float], points: int = 40) -> list[float]:
    """Centred moving average over about len/points records (an EMA would lag behind a falling loss)."""
    n = len(values)
    half = max(0, n // points) // 2
    c = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    return [(c[min(n, i + half + 1)] - c[max(0, i - half)]) / (min(n, i + half + 1) - max(0, i - half))
            for i in range(n)]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_loss_curves(metrics_paths: dict[str, str | Path], out_png: str | Path, title: str = "Loss",
                     log_y: bool = False) -> Path:
    """Train (raw, faint, plus a smoothed line) and val curves of each labelled metrics.jsonl in one PNG."""
    out_png = Path(out_png)
    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    plotted = False
    colors = ["C0", "C1", "C2", "C3", "C4", "C5", "C6"]
    for n, (label, path) in enumerate(metrics_paths.items()):
        recs = read_metrics(path)
        c = colors[n % len(colors)]
        train = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train" and _finite(r.get("loss"))]
        val = [(r["step"], r["val_loss"]) for r in recs if r.get("kind") == "val" and _finite(r.get("val_loss"))]
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, losses, color=c, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(losses), color=c, linewidth=1.5, label=f"{label} train")
            plotted = True
        if val:
            steps, losses = zip(*val)
            ax.plot(steps, losses, color=c, linestyle="--", marker="o", markersize=3, label=f"{label} val")
            plotted = True
    if not plotted:
        ax.text(0.5, 0.5, "no loss records yet", ha="center", va="center", transform=ax.transAxes)
    elif log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())  # "2.0", not "2 x 10^0"
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if plotted:
        ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


def _stage_metrics(run_dir: Path) -> dict[str, Path]:
    return {stage: run_dir / stage / "metrics.jsonl" for stage in ("pretrain", "finetune")
            if (run_dir / stage / "metrics.jsonl").is_file()}


def compare_runs(run_a: str | Path, run_b: str | Path, out_png: str | Path, log_y: bool = False) -> Path:
    """Overlay the pretrain/finetune curves of two run directories (or two metrics.jsonl files)."""
    paths: dict[str, Path] = {}
    for run in (Path(run_a), Path(run_b)):
        name = run.parent.name if run.is_file() else run.name
        if run.is_file():
            paths[name] = run
        else:
            for stage, p in _stage_metrics(run).items():
                paths[f"{name} {stage}"] = p
    return plot_loss_curves(paths, out_png, title=f"{Path(run_a).name} vs {Path(run_b).name}", log_y=log_y)


# ---- tables --------------------------------------------------------------------------------------

def _fmt_num(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def format_cell(row: dict, col: str) -> str:
    """A cell's text: the value, with "± se" when the row holds `<col>_se` (or `se` for exact_match)."""
    if col not in row:
        return ""
    text = _fmt_num(row[col])
    se = row.get(f"{col}_se", row.get("se") if col == "exact_match" else None)
    if _finite(se):
        text += f" ± {_fmt_num(float(se))}"
    return text


def _columns(rows: Sequence[dict], columns: Sequence[str] | None) -> list[str]:
    """Columns to show: the given ones (or every key, in order of appearance) that some row holds as a
    scalar; `x_se` / `se` columns are dropped when their metric is shown, since the cell reads "x ± se"."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    cols = [c for c in columns if any(c in r and not isinstance(r[c], (list, dict)) for r in rows)]
    shown = set(cols)
    return [c for c in cols if not (c.endswith("_se") and c[:-3] in shown) and not (c == "se" and "exact_match" in shown)]


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table; columns absent from every row are dropped."""
    cols = _columns(rows, columns)
    if not cols:
        return ""

    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    lines += ["| " + " | ".join(esc(format_cell(r, c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def print_table(rows: Sequence[dict], columns: Sequence[str] | None = None, title: str | None = None,
                console=None) -> None:
    """The same table on the console with rich."""
    from rich.console import Console
    from rich.table import Table

    cols = _columns(rows, columns)
    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="left" if c in ("model", "split", "task") else "right")
    for r in rows:
        table.add_row(*(format_cell(r, c) for c in cols))
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or redirected: the whole table, not squeezed to 80 columns
            console = Console(width=max(80, console.measure(table, options=console.options.update_width(10**5)).maximum))
    console.print(table)


# ---- the report ----------------------------------------------------------------------------------

def _kv_table(d: dict, max_len: int = 120) -> str:
    """A two-column markdown table of a (possibly nested) dict, nested keys dotted."""
    flat: list[tuple[str, str]] = []

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict) and v:
            for k, sub in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), sub)
        else:
            text = _fmt_num(v) if isinstance(v, (int, float)) else json.dumps(v, ensure_ascii=False) \
                if isinstance(v, (list, dict)) else str(v)
            flat.append((prefix, text if len(text) <= max_len else text[:max_len - 3] + "..."))

    walk("", d)
    return format_table([{"key": k, "value": v} for k, v in flat], ["key", "value"])


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in str(text).splitlines()) or ">"


def _to_html(md: str, title: str) -> str:
    try:
        import markdown  # optional: proper tables and images when installed

        body = markdown.markdown(md, extensions=["tables", "fenced_code"])
    except ImportError:
        # Minimal fallback: show the plots as images, the markdown itself as preformatted text.
        imgs = []
        for line in md.splitlines():
            if line.startswith("![") and "](" in line and line.endswith(")"):
                src = line[line.index("](") + 2:-1]
                imgs.append(f'<p><img src="{html.escape(src)}" alt="plot" style="max-width:100%"></p>')
        body = "\n".join(imgs) + f"\n<pre>{html.escape(md)}</pre>"
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
            "pre{white-space:pre-wrap}</style></head>\n<body>\n" + body + "\n</body></html>\n")


def write_report(run_dir: str | Path, sections: dict) -> Path:
    """Write run_dir/report.md and run_dir/report.html; returns the markdown path.

    sections (all optional): title, config (dict), data (dict; default run_dir/data/manifest.json),
    tokenizer (dict), plots (PNG paths, relative ones inside run_dir, as a list or {label: path}; default: loss curves drawn from each
    stage's metrics.jsonl), evals (rows {model, split, loss, loss_se, ppl, acc, ...}), benchmarks
    (rows {model, task, acc, acc_norm, exact_match, ...}), answers ([{question, answer}]), samples
    ([{prompt, text}]), notes ([str]).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    title = sections.get("title") or f"chatforge report: {run_dir.name}"
    md: list[str] = [f"# {title}", ""]

    if sections.get("notes"):
        md += ["## Notes", ""] + [f"- {n}" for n in sections["notes"]] + [""]
    if sections.get("evals"):
        md += ["## Evaluation", "", "Loss in nats per token; ± is one standard error (clustered by sequence).", "",
               format_table(sections["evals"], EVAL_COLUMNS), ""]
    if sections.get("benchmarks"):
        md += ["## Benchmarks", "", format_table(sections["benchmarks"], BENCH_COLUMNS), ""]
    comp = sections.get("comparison")
    if comp:
        md += ["## From scratch vs pre-trained, both fine-tuned on the same chats", "",
               f"Greedy replies to {comp['rows'][0].get('questions')} held-out questions; ROUGE-L F1 against the "
               f"reference answers; end-of-turn: the share of replies that end at the model's end-of-turn "
               f"token; general loss: the run's validation text in nats per token of each model's own tokenizer "
               f"(compare before with after, not across models). "
               f"`chatforge chat/serve/export` of this run use **{comp['best']}**.", "",
               format_table(comp["rows"]), ""]
        for a in comp["answers"][:10]:
            md += [f"**Q:** {a['question']}", "", f"- reference: {a.get('reference')}"]
            md += [f"- {m}: {a.get(m, '(no reply)')!s}".replace("\n", " ") for m in comp["models"]] + [""]
    if sections.get("answers"):
        md += ["## Answers to held-out questions", ""]
        for a in sections["answers"]:
            md += [f"**Q:** {a.get('question', '')}", "", _quote(a.get("answer", "")), ""]
    plots = sections.get("plots")
    if plots is None:  # draw the loss curves of whatever stages have metrics
        plots = {}
        for stage, p in _stage_metrics(run_dir).items():
            plots[f"{stage} loss"] = plot_loss_curves({stage: p}, run_dir / stage / "loss.png",
                                                      title=f"{stage} loss")
    if isinstance(plots, (list, tuple)):
        plots = {Path(p).stem: p for p in plots}
    if plots:
        md += ["## Loss curves", ""]
        for label, p in plots.items():
            p = Path(p) if Path(p).is_absolute() else run_dir / p  # relative paths are inside the run
            try:
                rel = p.resolve().relative_to(run_dir.resolve())
            except ValueError:
                rel = p.resolve()
            md += [f"**{label}**", "", f"![{label}]({rel.as_posix()})", ""]

    data = sections.get("data")
    manifest = run_dir / "data" / "manifest.json"
    if data is None and manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            data = {"manifest": f"{manifest} is not valid JSON"}
    if isinstance(data, dict) and "splits" in data:  # a manifest: a summary here, the details stay in the file
        summary = {}
        for split, v in data["splits"].items():
            summary[f"{split}: documents"] = v.get("documents")
            summary[f"{split}: bytes"] = v.get("bytes")
        for key in ("documents_read", "documents_kept", "dropped", "read_errors", "masked", "stopped_by"):
            if data.get(key):
                summary[key] = data[key]
        data = summary
    if data:
        md += ["## Data", "", _kv_table(data) if isinstance(data, dict) else str(data), ""]
    if sections.get("tokenizer"):
        md += ["## Tokenizer", "", _kv_table(sections["tokenizer"]), ""]

    if sections.get("samples"):
        md += ["## Samples", ""]
        for s in sections["samples"]:
            head = f"step {s['step']}: " if "step" in s else ""
            md += [f"**{head}{s.get('prompt', '')}**", "", _quote(s.get("text", "")), ""]

    if sections.get("config"):
        md += ["## Config", "", _kv_table(sections["config"]), ""]
    text = "\n".join(md).rstrip() + "\n"
    md_path = run_dir / "report.md"
    md_path.write_text(text, encoding="utf-8")
    (run_dir / "report.html").write_text(_to_html(text, title), encoding="utf-8")
    return md_path
