"""What machine a figure was measured on: CPU model and the flags that decide kernel speed, torch, threads.

Machines of one kind differ (one has AMX or avx512_bf16, another no bf16 units at all), so every benchmark
prints this line beside its numbers.
"""
from __future__ import annotations

import platform

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
