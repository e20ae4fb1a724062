"""GRPO (finetune.mode=grpo): the loss and gradient equal TRL's GRPOTrainer on the same batch, a tiny model
learns a verifiable task from its rewards, and bad input (a failing reward, an unknown task) is handled."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from chatforge import rewards as R
from chatforge.checkpoint import save_checkpoint
from chatforge.config import ModelConfig, TokenizerConfig, load_config
from chatforge.errors import UserError
from chatforge.finetune import run_finetune
from chatforge.grpo import (
    GRPOObjective,
    Scorer,
    encode_item,
    group_advantages,
    make_batch,
)
from chatforge.model import GPT
from chatforge.paths import RunPaths
from chatforge.tokenizer import Tokenizer
from chatforge.train import loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?"] * 5


@pytest.mark.parametrize("beta,off_policy", [(0.0, False), (0.04, False), (0.04, True)])
def test_loss_and_gradient_match_trl(tmp_path, beta, off_policy):
    """TRL 1.16 GRPOTrainer, instantiated offline, and its _compute_loss on the batch we train on."""
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from chatforge.export import export_hf

    Tokenizer.train(CORPUS, TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1)).save(tmp_path / "tok")
    tok = Tokenizer.load(tmp_path / "tok")
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=64, vocab_size=tok.vocab_size,
                            rope_theta=5000.0, norm_eps=1e-6, init_std=0.1))
    out = export_hf(model, tmp_path / "tok", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=4,
                          num_generations=4, beta=beta, temperature=0.7, use_cpu=True, bf16=False,
                          max_completion_length=8)
    assert args.loss_type == "dapo" and args.use_bias_correction_kl  # the defaults we follow
    trainer = trl.GRPOTrainer(model=hf, reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": ["hi"] * 8}),
                              processing_class=transformers.AutoTokenizer.from_pretrained(out))

    g = torch.Generator().manual_seed(1)
    B, P, lens = 4, 5, [3, 6, 1, 5]
    prompts = [torch.randint(10, tok.vocab_size, (P,), generator=g).tolist() for _ in range(B)]
    comps = [torch.randint(10, tok.vocab_size, (n,), generator=g).tolist() for n in lens]
    adv = torch.tensor([1.2, -0.5, 0.3, -1.0])
    C = max(lens)
    cids, cmask = torch.full((B, C), tok.pad_id), torch.zeros((B, C), dtype=torch.long)
    for i, c in enumerate(comps):
        cids[i, :len(c)], cmask[i, :len(c)] = torch.tensor(c), 1
    ref = (-3 - torch.rand(B, C, generator=g)) * cmask
    old = (-5 + 0.5 * torch.randn(B, C, generator=g)) * cmask if off_policy else None  # ratios far from 1: clipping
    inputs = {"prompt_ids": torch.tensor(prompts), "prompt_mask": torch.ones(B, P, dtype=torch.long),
              "completion_ids": cids, "completion_mask": cmask, "advantages": adv,
              "num_items_in_batch": cmask.sum(), "ref_per_token_logps": ref, "old_per_token_logps": old}
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.zero_grad()
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()

    batch = make_batch(prompts, comps, adv, tok.pad_id)
    for key, src in (("ref_logp", ref), ("old_logp", old)):
        if src is not None:
            t = torch.zeros(batch["y"].shape)
            for i in range(B):
                t[i, P - 1:P - 1 + lens[i]] = src[i, :lens[i]]
            batch[key] = t
    obj = GRPOObjective(0.2, beta, 0.7)
    model.train()
    ours = obj.loss(model, batch) / obj.count(batch)
    ours.backward()
    assert obj.count(batch) == cmask.sum()
    assert abs(float(ours) - float(theirs)) < 1e-5
    hp = dict(trainer.model.named_parameters())
    compared = 0
    for n, p in model.named_parameters():
        q = hp[n if n.startswith("lm_head") else f"model.{n}"]
        assert (p.grad - q.grad).abs().max().item() < 1e-5, n
        compared += 1
    assert compared == len(hp)


def test_group_advantages_as_trl():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    a = group_advantages(r, 4)
    g = r.view(2, 4)
    want = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).reshape(-1)
    assert torch.allclose(a, want) and a[4:].abs().max() == 0  # a group that all agree teaches nothing


def test_split_is_disjoint_and_deterministic():
    items = R.addition_items(plain=True)
    train, held = R.split(items, 64)
    train2, held2 = R.split(list(reversed(items)), 64)
    assert len(held) == 64 and {it["prompt"] for it in held} == {it["prompt"] for it in held2}
    assert not {it["prompt"] for it in held} & {it["prompt"] for it in train}
    assert len(train) + len(held) == len(items) == len(train2) + len(held2)


def test_rewards():
    assert R.addition_reward("12+30=", " 42 and more", answer=42) == 1.0
    assert R.addition_reward("12+30=", "4 2", answer=42) == 0.0
    assert R.copy_reward("copy abc=", "abc", answer="abc") == 1.0
    assert R.copy_reward("copy abc=", "abcx", answer="abc") == 0.0
    assert R.final_number_reward("q", "so 3 + 4 = 7\n#### 1,234", answer="1234") == 1.0
    assert R.final_number_reward("q", "it is 5, no 7", answer="7") == 1.0


def test_failing_reward_scores_zero_and_is_counted_once(tmp_path, capsys):
    (tmp_path / "r.py").write_text("def reward(prompt, completion, **item):\n"
                                   "    if completion == 'boom':\n        raise ValueError('bad sample')\n"
                                   "    return float(len(completion) == int(item['n']))\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "say 3 letters", "n": 3}\nnot json\n{"prompt": "say 2", "n": 2}\n')
    task = R.get_task(f"{tmp_path / 'r.py'}:reward", str(tmp_path / "p.jsonl"))
    assert len(task.items) == 2 and task.skipped_lines == 1
    s = Scorer(task)
    it = task.items[0]
    assert [s(it, c) for c in ("abc", "boom", "boom", "ab")] == [1.0, 0.0, 0.0, 0.0]
    assert s.errors == 2
    assert capsys.readouterr().out.count("bad sample") == 1


@pytest.mark.parametrize("spec,prompts", [("subtraction", ""), ("addition:fancy", ""), ("gsm8k", ""),
                                          ("nofile.py:f", "x.jsonl")])
def test_bad_task_is_one_line_user_error(spec, prompts):
    with pytest.raises(UserError) as e:
        R.get_task(spec, prompts)
    assert "\n" not in str(e.value)


def test_grpo_raises_held_out_reward(tmp_path):
    """A tiny model pretrained (here, 600 steps) on `copy abc=abc` where 70% of the answers carry a stray "x"
    ("abcx": reward 0) copies, but greedily adds the x. GRPO on the copy task's rewards, through run_finetune,
    makes it stop after the copy: held-out greedy reward from ~0 to most prompts right (about 30 s)."""
    paths = RunPaths(tmp_path / "run")
    train, _ = R.split(R.copy_items(plain=True), 64)
    tok = Tokenizer.train([f"copy {it['answer']}={it['answer']}" for it in train[:3000]],
                          TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1))
    tok.save(paths.tokenizer)
    tok = Tokenizer.load(paths.tokenizer)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=32, vocab_size=tok.vocab_size)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    enc = [(encode_item(tok, it), tok.encode(it["answer"]) + [tok.eos_id]) for it in train]
    x = tok.encode("x")
    for _ in range(600):
        rows = [enc[rng.randrange(len(enc))] for _ in range(32)]
        rows = [(p, c if rng.random() < 0.3 else c[:-1] + x + c[-1:]) for p, c in rows]
        loss, n = loss_sum(model, make_batch([p for p, _ in rows], [c for _, c in rows], torch.zeros(32),
                                             tok.pad_id))
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(paths.pretrain / "ckpt", 600, model, None, None, None,
                    {"tokenizer_hash": tok.hash, "model": dataclasses.asdict(cfg)}, val_loss=1.0)

    c = load_config(None, [
        "finetune.mode=grpo", "finetune.grpo.task=copy:plain", "finetune.grpo.group=8",
        "finetune.grpo.prompts_per_step=8", "finetune.grpo.max_new_tokens=8", "finetune.grpo.eval_prompts=64",
        "finetune.steps=40", "finetune.lr=1e-3", "finetune.warmup_steps=0", "finetune.schedule=constant",
        "finetune.weight_decay=0", "finetune.eval_every=0", "finetune.log_every=5", "finetune.device=cpu",
        "finetune.compile=off"])
    res = run_finetune(c, paths)
    before, after = res["eval"]["before"], res["eval"]["after"]
    assert before["prompts"] == after["prompts"] == 64
    assert after["reward"] >= before["reward"] + 0.4, (before, after)
    import json
    recs = [json.loads(line) for line in (paths.finetune / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert {"reward", "reward_std", "completion_len", "reward_errors"} <= set(train_recs[-1])
    assert train_recs[-1]["reward"] > train_recs[0]["reward"]
