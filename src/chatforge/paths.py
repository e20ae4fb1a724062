"""The run directory: every artifact of one pipeline run, so any stage can re-run from its inputs."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


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

    def stage_config(self, stage: str) -> Path:  # configs/<stage>.yaml: the config that stage last ran with
        return self.root / "configs" / f"{stage}.yaml"

    def save_config(self, cfg, stage: str, run_config: bool = True) -> None:
        """configs/<stage>.yaml (how this stage's outputs were made, command-line settings included) and, for
        the stages that build the run, its config.yaml (later stages start from it)."""
        from .config import save_config
        self.stage_config(stage).parent.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.stage_config(stage))
        if run_config:
            save_config(cfg, self.config)

    @staticmethod
    def guard(path: Path, force: bool, what: str) -> None:
        """Refuse to overwrite a user's outputs unless --force (then remove them)."""
        if path.exists() and any(path.iterdir() if path.is_dir() else [path]):
            if not force:
                raise UserError(f"{what} already exists at {path}; pass --force to overwrite it "
                                f"(or choose another --run-dir)")
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    @staticmethod
    def need(path: Path, stage: str) -> None:
        if not path.exists():
            raise UserError(f"{path} not found: run `chatforge {stage}` for this run directory first")
