"""Model size presets: parameter counts built on the meta device, the size table, the GPU MFU script's CPU exit."""
from __future__ import annotations

import re

import subprocess
import sys
from pathlib import Path

import pytest

from chatforge.config import load_config
from chatforge.model import main, size_summary

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset,millions", [("gpt2-124m", 124), ("gpt2-350m", 355), ("gpt2-774m", 774),
                                              ("llama-1b", 1040)])
def test_size_presets_have_their_parameter_count(preset, millions):
    cfg = load_config(preset)
    assert cfg.model.vocab_size == 0  # taken from the tokenizer, whose vocabulary the preset sets
    cfg.model.vocab_size = cfg.tokenizer.vocab_size
    s = size_summary(cfg.model)
    assert abs(s["params"] / 1e6 - millions) / millions < 0.02, s
    assert s["non_embedding_params"] == s["params"] - cfg.model.vocab_size * cfg.model.n_embd  # tied head
    m = cfg.model
    assert s["flops_per_token"] == 6 * s["params"] + 12 * m.n_layer * m.n_embd * m.seq_len
    assert cfg.train.compile == "on" and m.seq_len >= 1024


def test_gpt2_124m_with_vocab_50304():
    cfg = load_config("gpt2-124m").model
    cfg.vocab_size = 50304
    n = size_summary(cfg)["params"]
    assert 123e6 < n < 125e6, n  # GPT-2 small: 124M (ours has no learned position table: RoPE)


def test_size_table_prints_every_requested_preset(capsys):
    main(["tiny", "gpt2-124m"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["preset", "layers"] and len(out) == 3
    assert out[2].split()[0] == "gpt2-124m" and "123.6M" in out[2]


def test_gpu_mfu_benchmark_exits_clearly_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run the real measurement")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_mfu_gpu.py")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr, p.stderr


def test_benchmarks_print_the_machine():
    """Every benchmark prints the CPU model and its kernel flags beside its numbers (machines differ)."""
    import torch

    from chatforge.machine import cpu, describe
    name, flags = cpu()
    line = describe()
    assert name and f"CPU {name}" in line and torch.__version__ in line and all(f in line for f in flags)
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        assert re.search(r"print\((machine\.)?describe\(\)", script.read_text()), script.name
