"""Time to nanoGPT's val loss 1.8857 on char-level tinyshakespeare: nanoGPT's README CPU command vs chatforge's
recipe (benchmarks/bench_shakespeare.py, configs/shakespeare-char.yaml), run back to back on this machine.

Each side is one whole process, timed from outside (time.perf_counter around the child); the time at which it
first reached val <= 1.8857 is when its evaluation line came out (nanoGPT: "step N: train loss X, val loss Y";
chatforge: "step N: val loss Y"), also from outside, so interpreter start, imports and data loading count.

    .venv/bin/python benchmarks/bench_nanogpt.py --nanogpt ~/nanoGPT             # or NANOGPT_DIR=~/nanoGPT
    .venv/bin/python benchmarks/bench_nanogpt.py --nanogpt ~/nanoGPT --eval-interval 50 --png out.png

nanoGPT needs only torch and numpy here (plus requests, imported by its prepare.py): its data is
../shared/data/tinyshakespeare.txt copied to DIR/data/shakespeare_char/input.txt, then its prepare.py.
Without a nanoGPT directory the script prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
TARGET = 1.8857
# nanoGPT README, "I only have a macbook" (CPU) command
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
NANO_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
CF_EVAL = re.compile(r"step (\d+): val loss ([\d.]+)")


def run_timed(cmd: list[str], cwd: Path, pattern: re.Pattern, val_group: int, echo: bool):
    """Run cmd; return (wall s, [(t s, step, val)], the output, returncode). Times are from just before spawn."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    evals, lines = [], []
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as p:
        for line in p.stdout:
            t = time.perf_counter() - t0
            lines.append(line)
            m = pattern.search(line)
            if m:
                evals.append((t, int(m.group(1)), float(m.group(val_group))))
                if echo:
                    print(f"  [{t:6.1f} s] {line.rstrip()}", flush=True)
        rc = p.wait()
    return time.perf_counter() - t0, evals, "".join(lines), rc


def first_hit(evals):
    return next(((t, s, v) for t, s, v in evals if v <= TARGET), None)


def prepare_nanogpt(d: Path, python: str) -> None:
    dd = d / "data" / "shakespeare_char"
    if not (dd / "input.txt").exists():
        shutil.copyfile(DATA, dd / "input.txt")  # prepare.py downloads it only when missing
    if not (dd / "train.bin").exists() or not (dd / "val.bin").exists() or not (dd / "meta.pkl").exists():
        subprocess.run([python, "prepare.py"], cwd=dd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", type=Path, default=os.environ.get("NANOGPT_DIR"),
                    help="a nanoGPT checkout (default: $NANOGPT_DIR)")
    ap.add_argument("--eval-interval", type=int, default=0,
                    help="also evaluate every N steps on both sides for a finer time-to-target (e.g. 50); "
                         "0: the README command as is (nanoGPT evaluates every 250) and the recipe as is")
    ap.add_argument("--python", default=sys.executable, help="interpreter for both (default: this one)")
    ap.add_argument("--png", type=Path, default=None, help="write val loss vs wall time here")
    ap.add_argument("--skip-nanogpt", action="store_true", help="chatforge side only (for the plot)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides passed to bench_shakespeare.py")
    args = ap.parse_args()

    from chatforge.machine import describe
    print(describe(), flush=True)
    nano = args.nanogpt.expanduser().resolve() if args.nanogpt else None
    if not args.skip_nanogpt and (nano is None or not (nano / "train.py").exists()):
        print(f"nanoGPT not found ({'--nanogpt/NANOGPT_DIR not set' if nano is None else f'no {nano}/train.py'}); "
              f"skipping the comparison")
        return 0
    if not DATA.exists():
        print(f"{DATA} not found; skipping")
        return 0

    results = {}
    if not args.skip_nanogpt:
        prepare_nanogpt(nano, args.python)
        out_dir = tempfile.mkdtemp(prefix="nanogpt-out-")  # its checkpoints, kept out of the checkout
        cmd = [args.python, "train.py", *NANOGPT_ARGS, f"--out_dir={out_dir}"]
        if args.eval_interval:
            cmd.append(f"--eval_interval={args.eval_interval}")
        print("nanoGPT:", " ".join(cmd[1:]), flush=True)
        wall, evals, text, rc = run_timed(cmd, nano, NANO_EVAL, 3, echo=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        if rc != 0:
            print(text[-3000:])
            print(f"nanoGPT exited with {rc}")
            return 1
        results["nanoGPT"] = (wall, evals)

    cmd = [args.python, str(ROOT / "benchmarks" / "bench_shakespeare.py"), *args.overrides]
    if args.eval_interval:
        cmd.append(f"train.eval_every={args.eval_interval}")
    print("chatforge:", " ".join(cmd[1:]), flush=True)
    wall, evals, text, rc = run_timed(cmd, ROOT, CF_EVAL, 2, echo=True)
    if rc != 0:
        print(text[-3000:])
        print(f"bench_shakespeare exited with {rc}")
        return 1
    full = re.search(r"final val loss: .*?([\d.]+) \(full split\)", text)
    results["chatforge"] = (wall, evals)

    print(f"\ntarget val loss {TARGET}; whole-process wall time measured from outside")
    for name, (wall, evals) in results.items():
        hit = first_hit(evals)
        last = evals[-1] if evals else (float("nan"), 0, float("nan"))
        hit_s = f"first reached at step {hit[1]} after {hit[0]:.1f} s" if hit else "NOT reached"
        extra = f", full-split {full.group(1)}" if name == "chatforge" and full else ""
        print(f"{name:9s} total {wall:6.1f} s, final val {last[2]:.4f} (step {last[1]}{extra}); {hit_s}")
    if len(results) == 2:
        (wn, en), (wc, ec) = results["nanoGPT"], results["chatforge"]
        hn, hc = first_hit(en), first_hit(ec)
        print(f"ratio chatforge/nanoGPT: total {wc / wn:.2f}x", end="")
        print(f", time to target {hc[0] / hn[0]:.2f}x" if hn and hc else "", flush=True)

    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, (wall, evals) in results.items():
            ax.plot([e[0] for e in evals], [e[2] for e in evals], "o-", ms=3, label=f"{name} (total {wall:.0f} s)")
            ax.axvline(wall, ls=":", lw=0.8, color=ax.lines[-1].get_color())
        ax.axhline(TARGET, color="gray", ls="--", lw=0.8, label=f"target {TARGET}")
        ax.set_xlabel("wall time since process start (s)")
        ax.set_ylabel("val loss")
        ax.set_ylim(1.6, 2.8)
        ax.set_title(describe().removeprefix("machine: "), fontsize=7)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
