"""DPO (finetune.mode=dpo): the loss and its gradients equal TRL's DPOTrainer on the same batch and model; pairs
in TRL's formats, bad pairs skipped and counted; a tiny run learns its preferences (full and LoRA) and resumes
exactly; `chatforge improve` runs its loop."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_finetune import NAMES, base_run, clone_run, ft, losses, sha, write_jsonl  # noqa: F401 (fixture)

from chatforge import dpo
from chatforge.checkpoint import resolve_checkpoint
from chatforge.config import ModelConfig, TokenizerConfig
from chatforge.errors import UserError
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?",
          "Once upon a time there was a little model that wanted to talk."] * 5

RECORDS = [
    {"prompt": [{"role": "user", "content": "Hello world"}], "chosen": [{"role": "assistant", "content": "how are you today?"}],
     "rejected": [{"role": "assistant", "content": "the lazy dog."}]},
    {"prompt": [{"role": "user", "content": "Once upon a time"}],
     "chosen": [{"role": "assistant", "content": "there was a little model"}], "rejected": [{"role": "assistant", "content": "fox"}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown"}],
     "chosen": [{"role": "assistant", "content": "fox jumps"}], "rejected": [{"role": "assistant", "content": "model that wanted to talk"}]},
]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tokenizer, a reference GPT and a perturbed policy, each also exported as a transformers folder."""
    d = tmp_path_factory.mktemp("dpo")
    Tokenizer.train(CORPUS, TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1)).save(d / "tok")
    tok = Tokenizer.load(d / "tok")
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=64, vocab_size=tok.vocab_size,
                      rope_theta=5000.0, norm_eps=1e-6, init_std=0.1)
    ref = GPT(cfg).eval()
    pol = copy.deepcopy(ref)
    with torch.no_grad():
        for p in pol.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    from chatforge.export import export_hf
    export_hf(ref, d / "tok", d / "hf_ref")
    export_hf(pol, d / "tok", d / "hf_pol")
    return d, tok, ref, pol


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_loss_and_gradients_equal_trl(tiny_pair, loss_type, beta, tmp_path, monkeypatch):
    """TRL's own DPOTrainer (its tokenization, collator and _compute_loss, the reference from a ref model) vs
    chatforge's plan pieces (tokenize_pair, reference_logps from the starting model, collate, DPOObjective)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    d, tok, ref, pol = tiny_pair
    hf_ref = transformers.AutoModelForCausalLM.from_pretrained(d / "hf_ref", dtype=torch.float32)
    hf_pol = transformers.AutoModelForCausalLM.from_pretrained(d / "hf_pol", dtype=torch.float32)
    htok = transformers.AutoTokenizer.from_pretrained(d / "hf_pol")
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], beta=beta, loss_type=[loss_type],
                         use_cpu=True, bf16=False)  # fp32 both sides (bf16 autocasts the ref)
    trainer = trl.DPOTrainer(model=hf_pol, ref_model=hf_ref, args=args,
                             train_dataset=datasets.Dataset.from_list(RECORDS), processing_class=htok)
    examples = [trainer.train_dataset[i] for i in range(len(RECORDS))]
    batch = trainer.data_collator(examples)
    trainer.model.train()
    trainer.model.zero_grad()
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()

    # chatforge: the same token ids (TRL's rule for where the completion starts), the reference from `ref`.
    pairs = []
    for rec, ex in zip(RECORDS, examples):
        _, p, c, r = dpo.normalize_pair(rec)
        ids = dpo.tokenize_pair(tok, p, c, r)
        assert list(ids) == [ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]]
        pairs.append({"prompt_ids": ids[0], "chosen_ids": ids[1], "rejected_ids": ids[2]})
    dpo.reference_logps(ref, pairs, tok.pad_id, "cpu")
    model = copy.deepcopy(pol).train()
    obj = dpo.DPOObjective(beta, loss_type)
    b = dpo.collate(pairs, tok.pad_id)
    ours = obj.loss(model, b) / obj.count(b)
    ours.backward()
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())

    hf_params = dict(trainer.model.named_parameters())
    compared = 0
    for name, p in model.named_parameters():
        q = hf_params.get(f"model.{name}", hf_params.get(name))
        if q is None or not torch.equal(p.detach(), q.detach()):  # a permuted export layout: not comparable 1:1
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=0)
        compared += 1
    assert compared >= len(list(model.parameters())) - 1  # every tensor (a tied head is one)
    stats = obj.stats()
    assert 0 <= stats["reward_accuracy"] <= 1


def test_formats_and_bad_pairs_are_counted(tiny_pair, tmp_path):
    _, tok, _, _ = tiny_pair
    long = "the lazy dog " * 40
    recs = [
        {"prompt": "Hello world", "chosen": "how are you today?", "rejected": "fox"},  # standard
        RECORDS[0],  # conversational
        {"chosen": RECORDS[1]["prompt"] + RECORDS[1]["chosen"], "rejected": RECORDS[1]["prompt"] + RECORDS[1]["rejected"]},
        {"prompt": "Hello", "chosen": "", "rejected": "fox"},  # empty
        {"prompt": "Hello", "chosen": "fox", "rejected": "fox"},  # identical
        {"prompt": "Hello", "chosen": long, "rejected": "fox"},  # too long
        {"prompt": long, "chosen": "a", "rejected": "b"},  # prompt too long
        {"text": "no pair"},
    ]
    f = write_jsonl(tmp_path / "pairs.jsonl", recs)
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    pairs, info = dpo.load_pairs(tok, [str(f)], 64)
    assert info["formats"] == {"standard": 1, "conversational": 1, "implicit_prompt": 1}
    assert info["skipped"] == {"empty": 1, "identical": 1, "too_long": 2, "bad_format": 1}
    # The implicit prompt is the common prefix: the same ids as the explicit record.
    explicit = dpo.tokenize_pair(tok, *dpo.normalize_pair(RECORDS[1])[1:])
    assert (pairs[2]["prompt_ids"], pairs[2]["chosen_ids"], pairs[2]["rejected_ids"]) == explicit
    assert all(p["chosen_ids"][-1] == tok.end_id for p in pairs)  # the end-of-turn is part of the completion
    with pytest.raises(UserError, match="broken.jsonl"):
        dpo.load_pairs(tok, [str(tmp_path / "broken.jsonl")], 64)


def test_loader_resumes_exactly(tiny_pair):
    _, tok, _, _ = tiny_pair
    pairs = [{"prompt_ids": [0, 4, i], "chosen_ids": [9, i, 6], "rejected_ids": [8, 6], "ref": [0.0, 0.0]}
             for i in range(7, 20)]
    a = dpo.DPOLoader(pairs, 3, 64, pad_id=tok.pad_id, seed=1)
    for _ in range(5):
        a.next_batch()
    b = dpo.DPOLoader(pairs, 3, 64, pad_id=tok.pad_id, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(6):
        x, y = a.next_batch(), b.next_batch()
        assert all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------- end to end on a tiny run

def preference_records(n: int = 120) -> list[dict]:
    """Greet the right person (chosen) rather than the wrong one (rejected)."""
    return [{"prompt": f"Say hello to {NAMES[i % len(NAMES)]}{i}.", "chosen": f"Hello, {NAMES[i % len(NAMES)]}{i}!",
             "rejected": f"Goodbye, {NAMES[(i + 5) % len(NAMES)]}{i + 3}."} for i in range(n)]


DPO_SETTINGS = ("finetune.steps=16", "finetune.eval_every=8", "finetune.log_every=1", "finetune.schedule=constant",
                "finetune.warmup_steps=0", "finetune.lr=0.003", "finetune.batch_size=8", "finetune.dpo.val_fraction=0.2")


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_dpo_run_learns_preferences_and_resumes_exactly(base_run, tmp_path, lora_rank, monkeypatch):  # noqa: F811 (the fixture)
    cfg, paths = clone_run(base_run, tmp_path, *DPO_SETTINGS)
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", preference_records())
    settings = {"mode": "dpo", "inputs": [str(pairs_file)], "lora_rank": lora_rank}
    out = ft(cfg, paths, **settings)
    ev = json.loads((paths.finetune / "finetune_eval.json").read_text())
    b, a = ev["before"], ev["after"]
    assert b["heldout_pairs"] == a["heldout_pairs"] >= 10
    assert b["reward_accuracy"] == 0.0 and abs(b["reward_margin"]) < 1e-6  # the policy starts as the reference
    assert a["reward_accuracy"] >= 0.9 and a["reward_margin"] > 0.5
    assert a["logp_chosen"] - a["logp_rejected"] > b["logp_chosen"] - b["logp_rejected"]
    assert ev["data"]["train"] + ev["data"]["val"] == 120 and ev["data"]["skipped"] == {}
    recs = [json.loads(line) for line in (paths.finetune / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_accuracy" in r for r in recs if r["kind"] == "train")
    assert any("reward_margin" in r for r in recs if r["kind"] == "val")
    final = sha(resolve_checkpoint(paths.finetune / "ckpt", "best") / "model.safetensors")
    straight = losses(paths.finetune / "metrics.jsonl")
    assert out["step"] == 16

    # Interrupted at step 5 (a SIGTERM from the loop's test hook), resumed: the same losses and weights.
    import chatforge.train as train_mod
    monkeypatch.setattr(train_mod, "SIGNAL_AT_STEP", 5)
    part = ft(cfg, paths, force=True, **settings)
    assert part["interrupted"] and part["step"] == 5
    monkeypatch.setattr(train_mod, "SIGNAL_AT_STEP", 0)
    ft(cfg, paths, resume=True, **settings)
    assert losses(paths.finetune / "metrics.jsonl")["train"] == straight["train"]
    resumed = losses(paths.finetune / "metrics.jsonl")["val"]
    assert {k: resumed[k] for k in straight["val"]} == straight["val"]  # (+ the evaluation at the interrupt)
    assert sha(resolve_checkpoint(paths.finetune / "ckpt", "best") / "model.safetensors") == final


def test_dpo_without_usable_pairs_names_the_file(base_run, tmp_path):  # noqa: F811 (the fixture)
    cfg, paths = clone_run(base_run, tmp_path, *DPO_SETTINGS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "same", "rejected": "same"}])
    with pytest.raises(UserError, match="bad.jsonl"):
        ft(cfg, paths, mode="dpo", inputs=[str(bad)])
    with pytest.raises(UserError, match="dpo.loss"):
        ft(cfg, paths, mode="dpo", inputs=[str(write_jsonl(tmp_path / "p.jsonl", preference_records(10)))],
           force=True, dpo=type(cfg.finetune.dpo)(loss="hinge"))


# ---------------------------------------------------------------- the improve loop

def test_improve_loop_two_rounds_writes_a_consistent_table(base_run, tmp_path, capsys):  # noqa: F811 (the fixture)
    from chatforge.cli import main
    _, paths = clone_run(base_run, tmp_path)
    rc = main(["improve", str(paths.root), "--task", "chat", "--rounds", "2", "--max-items", "10",
               "--heldout-items", "6", "finetune.steps=6", "finetune.eval_every=3", "finetune.batch_size=4",
               "finetune.lr=0.003", "finetune.warmup_steps=0", "generate.max_new_tokens=12", "finetune.device=cpu",
               "finetune.compile=off", "finetune.dpo.val_fraction=0.2"])
    assert rc == 0
    summary = json.loads((paths.root / "improve" / "summary.json").read_text())
    r1, r2 = summary["rounds"]
    assert summary["train_items"] == 10 and summary["heldout_items"] == 6
    for k, r in enumerate((r1, r2), 1):
        rdir = paths.root / "improve" / f"round_{k}"
        lines = (rdir / "pairs.jsonl").read_text().splitlines()
        assert len(lines) == r["pairs"] == r["wrong"] - r["unpaired"] >= 2
        assert r["dpo"]["pairs_train"] + r["dpo"]["pairs_val"] == r["pairs"]
        assert (rdir / "init" / "model.safetensors").is_file() and (rdir / "finetune_eval.json").is_file()
        pair = json.loads(lines[0])
        assert pair["chosen"][0]["role"] == "assistant" and pair["chosen"] != pair["rejected"]
        for side in ("heldout_before", "heldout_after"):
            assert 0.0 <= r[side]["score"] <= 1.0 and 0.0 <= r[side]["correct"] <= 1.0
    # Round 2 starts from round 1's model, and its "before" is round 1's "after".
    assert r2["heldout_before"] == r1["heldout_after"]
    assert r2["init_sha256"] == r1["model_sha256"] != r1["init_sha256"]
    assert sha(paths.root / "improve" / "round_2" / "init" / "model.safetensors") == r1["model_sha256"]
    assert sha(Path(r2["model"]) / "model.safetensors") == r2["model_sha256"]  # the run's model is the last round's
    out = capsys.readouterr().out
    assert "improve: chat (ROUGE-L)" in out and "->" in out
