"""Settings arrive one way: a flag that is a setting is written into its config field, so it is saved in the
config of the stage that ran (RUN/configs/<stage>.yaml) and `--resume` reads it back without the flag."""
from __future__ import annotations

import yaml

from chatforge.cli import build_parser, main, resolve
from chatforge.config import load_config, save_config
from chatforge.paths import RunPaths


def _args(argv: list[str]):
    parser = build_parser()
    args = parser.subcommands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def test_prepare_flags_are_saved_in_the_stage_config(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("A sentence long enough to be kept as a document by prepare.\n" * 20)
    run = tmp_path / "run"
    assert main(["prepare", "--config", "tiny", "--run-dir", str(run), "--input", str(text), "--strict",
                 "--text-field", "body", "data.min_chars=10"]) == 0
    saved = yaml.safe_load((run / "configs" / "prepare.yaml").read_text())
    assert saved["data"]["inputs"] == [str(text)] and saved["data"]["strict"] is True
    assert saved["data"]["text_field"] == "body" and saved["data"]["min_chars"] == 10
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["inputs"] == [str(text)]


def test_finetune_and_serve_flags_become_config_fields(tmp_path):
    cfg, _, _ = resolve(_args(["finetune", str(tmp_path), "--input", "a.jsonl", "b.jsonl", "--init", "ckpt/x",
                               "--mode", "cpt", "--lora-rank", "4", "--lora-targets", "q_proj,v_proj",
                               "finetune.lr=0.5"]))
    f = cfg.finetune
    assert (f.inputs, f.init_from, f.mode, f.lora_rank, f.lora_targets, f.lr) == \
        (["a.jsonl", "b.jsonl"], "ckpt/x", "cpt", 4, ["q_proj", "v_proj"], 0.5)
    cfg, _, _ = resolve(_args(["serve", str(tmp_path), "--host", "0.0.0.0", "--max-batch", "3", "--device", "cpu"]))
    assert (cfg.serve.host, cfg.serve.max_batch, cfg.serve.port, cfg.generate.device) == ("0.0.0.0", 3, 8000, "cpu")
    cfg, _, _ = resolve(_args(["serve", str(tmp_path)]))  # no flag: the config's value stands
    assert (cfg.serve.host, cfg.serve.max_batch) == ("127.0.0.1", 8)


def test_resume_reads_the_stage_config_so_flags_need_not_be_repeated(tmp_path):
    paths = RunPaths(tmp_path)
    cfg = load_config("tiny")
    cfg.finetune.inputs, cfg.finetune.lora_rank = ["domain.txt"], 8
    paths.save_config(cfg, "finetune", run_config=False)
    later = load_config("tiny")
    later.train.steps = 7
    save_config(later, paths.config)  # the run's config.yaml, rewritten by another stage since
    resumed, _, _ = resolve(_args(["finetune", str(tmp_path), "--resume"]))
    assert resumed.finetune.inputs == ["domain.txt"] and resumed.finetune.lora_rank == 8
    fresh, _, _ = resolve(_args(["finetune", str(tmp_path)]))  # not resuming: the run's config.yaml
    assert fresh.finetune.inputs == [] and fresh.train.steps == 7


def test_old_run_configs_with_retired_keys_still_load(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump({"train": {"init_from": "", "steps": 3}}))
    assert load_config(str(p)).train.steps == 3


def test_a_bad_choice_is_refused_when_read_and_force_deletes_nothing(tmp_path, capsys):
    import pytest

    from chatforge.errors import UserError
    with pytest.raises(UserError, match="'train.precision': 'fp16' is not one of auto, fp32, bf16"):
        load_config("tiny", ["train.precision=fp16"])
    with pytest.raises(UserError, match="'finetune.mode'"):
        load_config("tiny", ["finetune.mode=rlhf"])
    run = tmp_path / "run"
    (run / "pretrain" / "ckpt").mkdir(parents=True)
    (run / "pretrain" / "ckpt" / "keep.txt").write_text("a user's checkpoint")
    assert main(["pretrain", "--config", "tiny", "--run-dir", str(run), "--force", "train.optimizer=adam"]) == 2
    assert "'train.optimizer': 'adam' is not one of adamw, sgd, muon" in capsys.readouterr().err
    assert (run / "pretrain" / "ckpt" / "keep.txt").read_text() == "a user's checkpoint"
