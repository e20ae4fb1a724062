"""The run directory: every artifact of one pipeline run, so any stage can re-run from its inputs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:  # config.yaml: the config that made the run
        return self.root / "config.yaml"

    @property
    def data(self) -> Path:  # prepared documents: {train,val}-NNNNN.jsonl.zst, manifest.json, sft_{train,val}.jsonl
        return self.root / "data"

    @property
    def tokenizer(self) -> Path:  # tokenizer.json, tokenizer_config.json
        return self.root / "tokenizer"

    @property
    def tokens(self) -> Path:  # token shards: tokens/{train,val}/shard_NNNNN.bin
        return self.root / "tokens"

    @property
    def pretrain(self) -> Path:  # ckpt/step_N/, metrics.jsonl, loss.png
        return self.root / "pretrain"

    @property
    def imported(self) -> Path:  # `chatforge import`: ckpt/step_000000/ (a pre-trained model), source.json
        return self.root / "import"

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    @property
    def report(self) -> Path:
        return self.root / "report.md"
