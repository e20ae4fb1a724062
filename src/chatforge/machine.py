"""What machine a figure was measured on: CPU model and the flags that decide kernel speed, torch, threads.

Machines of one kind differ (one has AMX or avx512_bf16, another no bf16 units at all), so every benchmark
prints this line beside its numbers.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile", "amx_int8")


def cpu() -> tuple[str, list[str]]:
    """(model name, the FLAGS this CPU has) from /proc/cpuinfo; elsewhere the platform's processor name."""
    name, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not flags and name in ("", platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [x for x in FLAGS if x in have]
                    break
    except OSError:
        pass
    return name, flags


def describe() -> str:
    import torch
    name, flags = cpu()
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"machine: CPU {name}; flags {' '.join(flags) or '-'}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{gpu}")


def _cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chatforge" / "cpu_peak.json"


def _key(kind: str) -> str:
    import torch
    name, flags = cpu()
    return f"{platform.machine()} {name} [{' '.join(flags)}] threads={torch.get_num_threads()} {kind}"


def seen(kind: str) -> float:
    """The best rate measured here before for `kind` (0 when never): for decisions that need no fresh probe."""
    try:
        data = json.loads(_cache_path().read_text())
        return float(data.get(_key(kind), 0.0) or 0.0) if isinstance(data, dict) else 0.0
    except (OSError, ValueError, TypeError):
        return 0.0


def _load_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store_cache(data: dict) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: use this run's measurement


def _best_seen(kind: str, measured: float) -> float:
    """The best rate ever measured here for `kind`, kept in ~/.cache/chatforge: a probe run on a busy machine
    then does not take a low peak (and print an MFU that is too high, or pick the wrong precision)."""
    key, data = _key(kind), _load_cache()
    try:
        best = max(measured, float(data.get(key, 0.0) or 0.0))
    except (TypeError, ValueError):
        best = measured
    _store_cache({**data, key: best})
    return best


def _matmul_rate(dtype, sizes: tuple[int, ...], repeats: int = 4) -> float:
    """Best FLOP/s of a square matmul; the fastest single multiply counts (load from other jobs slows some)."""
    import torch
    best, g = 0.0, torch.Generator().manual_seed(0)  # own generator: the training RNG stream stays untouched
    for n in sizes:
        a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
        a @ b
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


@functools.lru_cache(maxsize=None)
def cpu_peak_flops(dtype_name: str = "float32") -> float:
    """This CPU's matmul peak in fp32 or bf16 (about a second to measure; best ever seen is cached). bf16 is
    first tried at 512: where the CPU has no bf16 units it runs ~100x slower than fp32, and larger sizes
    would take seconds to show what 512 already does."""
    import torch
    if dtype_name == "float32":
        return _best_seen("fp32", _matmul_rate(torch.float32, (1024, 2048)))
    if dtype_name != "bfloat16":
        raise ValueError(dtype_name)
    rate = _matmul_rate(torch.bfloat16, (512,), repeats=2)
    if rate > 0.5 * cpu_peak_flops("float32"):
        rate = max(rate, _matmul_rate(torch.bfloat16, (1024, 2048)))
    return _best_seen("bf16", rate)


def bf16_speedup() -> float:
    """bf16 matmul peak / fp32 matmul peak on this CPU (> 1 where it has bf16 units that pay: AMX, avx512_bf16)."""
    return cpu_peak_flops("bfloat16") / cpu_peak_flops("float32")


BF16_MIN_SPEEDUP = 1.3  # bf16 autocast casts and keeps fp32 master weights: below this the casts eat the gain


@functools.lru_cache(maxsize=None)
def bf16_speedup_at(width: int) -> float:
    """fp32 time / bf16 time of a matmul shaped like a training step of a model this wide ((4096 x width) @
    (width x 4 width), the bf16 casts autocast adds included): small models gain less than the peak ratio says,
    or lose. fp32 and bf16 are timed alternately within one probe (load from other jobs slows both alike), and
    the median of this machine's last 5 probes is used, so one noisy probe neither flips the choice nor prints
    a ratio that no single measurement showed."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4096, width, generator=g), torch.randn(4 * width, width, generator=g)
    runs = {"fp32": lambda: F.linear(x, w), "bf16": lambda: F.linear(x.bfloat16(), w.bfloat16())}
    best = {k: float("inf") for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(5):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return _recent_median(f"linear{width} bf16/fp32", best["fp32"] / best["bf16"])


def _recent_median(kind: str, measured: float, keep: int = 5) -> float:
    """The median of the last `keep` values measured here for `kind` (this one included), kept in the cache."""
    import statistics
    key, data = _key(kind), _load_cache()
    old = data.get(key)
    old = [float(v) for v in old if isinstance(v, (int, float))] if isinstance(old, list) else []
    recent = (old + [measured])[-keep:]
    _store_cache({**data, key: recent})
    return statistics.median(recent)


def choose_precision(device, requested: str = "auto", width: int = 0) -> tuple[str, str]:
    """("bf16" | "fp32", the reason, for the log). auto: bf16 autocast on CUDA GPUs with bf16, and on CPUs whose
    bf16 units (AMX, avx512_bf16) make a matmul at least BF16_MIN_SPEEDUP x faster than fp32 here: one shaped
    like this model's (`width` = n_embd), else the peak matmul; fp32 elsewhere."""
    import torch
    req = (requested or "auto").lower()
    if req in ("fp32", "float32"):
        return "fp32", "fp32 (asked for)"
    if req in ("bf16", "bfloat16"):
        return "bf16", "bf16 autocast (asked for)"
    if req != "auto":
        from .errors import UserError
        raise UserError(f"precision {requested!r} is not known; use auto, fp32 or bf16")
    dev = torch.device(device)
    if dev.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ("bf16", "bf16 autocast: CUDA GPU with bf16") if ok else ("fp32", "fp32: this GPU has no bf16")
    if dev.type != "cpu":
        return "fp32", f"fp32 on {dev.type}"
    name, flags = cpu()
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    if not units:
        return "fp32", "fp32: the CPU has no bf16 units (no AMX or avx512_bf16)"
    speed = bf16_speedup_at(width) if width else bf16_speedup()
    what = "AMX" if "amx_bf16" in units else "avx512_bf16"
    mm = f"this model's matmuls (width {width})" if width else "matmul"
    if speed >= BF16_MIN_SPEEDUP:
        return "bf16", f"bf16 autocast: {what} present, {mm} {speed:.1f}x fp32"
    return "fp32", f"fp32: {what} present but bf16 {mm} only {speed:.2f}x fp32 here"
