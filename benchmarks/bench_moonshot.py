"""Best tinyshakespeare val loss in a fixed wall-clock budget on this CPU (nanoGPT's GPU run: 1.4697).

Runs bench_shakespeare.py once per recipe, one after another (never in parallel: they would share the cores),
then plots val loss against wall time for all of them in one PNG and prints a table. A recipe's step count
is what sets its length: size it to the budget from a short run's tok/s.

    .venv/bin/python benchmarks/bench_moonshot.py --png benchmarks/moonshot_curves.png \\
        --run "6x384=model.n_layer=6 model.n_head=6 model.n_kv_head=6 model.n_embd=384 model.seq_len=256 ..."
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
GPU_VAL = 1.4697  # nanoGPT's README, shakespeare_char config on one GPU


def read_curve(out: Path) -> list[tuple[float, float, int]]:
    """(seconds into train(), val loss, step) of a run's evaluations, from its metrics.jsonl."""
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = sorted((r["step"], r["time"]) for r in recs if r["kind"] == "train")
    # an evaluation between two logged steps gets the time interpolated between them
    return [(float(np.interp(r["step"], [s for s, _ in logged], [t for _, t in logged])), r["val_loss"], r["step"])
            for r in recs if r["kind"] == "val" and logged and r["step"] <= logged[-1][0]]


def run_one(name: str, overrides: list[str], out: Path, threads: int) -> dict:
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty: give another --out (a run's metrics must not mix with an older one's)")
    cmd = [sys.executable, str(ROOT / "bench_shakespeare.py"), *overrides, "--out", str(out),
           "--threads", str(threads)]
    print(f"== {name}: {' '.join(overrides)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    curve = read_curve(out)
    print(f"   wall {summary['wall_s']} s, val {summary['val_random']:.4f} (random batches), "
          f"{summary['val_full']:.4f} (full split)", flush=True)
    return {"name": name, "overrides": overrides, "curve": curve, **summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], metavar="NAME=OVERRIDES",
                    help="a recipe: a name, '=', then bench_shakespeare overrides separated by spaces")
    ap.add_argument("--minutes", type=float, default=10.0, help="the budget (a line on the plot)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temp dir)")
    ap.add_argument("--replot", type=Path, default=None, help="table and plot again from an earlier --out")
    args = ap.parse_args()
    if args.replot:
        results = json.loads((args.replot / "results.json").read_text())
        for r in results:
            r["curve"] = read_curve(args.replot / r["name"])
    elif not args.run:
        sys.exit("give at least one --run (or --replot DIR)")
    else:
        from chatforge.machine import describe
        print(describe(), flush=True)
        base = args.out or Path(tempfile.mkdtemp(prefix="moonshot-"))
        results = []
        for spec in args.run:
            name, eq, ov = spec.partition("=")
            if not eq or not name.strip() or not all("=" in o for o in ov.split()):
                sys.exit(f"--run {spec!r}: write NAME=OVERRIDES, e.g. --run \"small=model.n_layer=2 train.steps=50\"")
            results.append(run_one(name, ov.split(), base / name, args.threads))
            (base / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "curve"}
                                                           for r in results], indent=1))
    budget = args.minutes * 60
    print(f"\n{'recipe':24s} {'wall s':>7s} {'val@budget':>10s} {'final val':>9s} {'full split':>10s}")
    for r in results:
        inside = [v for t, v, _ in r["curve"] if t <= budget]
        at = min(inside) if inside else float("nan")
        print(f"{r['name']:24s} {r['wall_s']:7.1f} {at:10.4f} {r['val_random']:9.4f} {r['val_full']:10.4f}")
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for r in results:
            ax.plot([t / 60 for t, _, _ in r["curve"]], [v for _, v, _ in r["curve"]], "o-", ms=2.5,
                    label=f"{r['name']} (full split {r['val_full']:.3f} at {r['wall_s'] / 60:.1f} min)")
        ax.axhline(GPU_VAL, color="k", ls="--", lw=0.8, label=f"nanoGPT GPU config {GPU_VAL}")
        ax.axvline(args.minutes, color="gray", ls=":", lw=0.8)
        ax.set_xlabel("wall time in train() (min)")
        ax.set_ylabel("val loss (random batches)")
        ax.set_ylim(1.4, 2.2)
        ax.set_title("tinyshakespeare char-level on 2 CPU cores")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
