"""The fine-tuning stage on a tiny real run: chat SFT (full and LoRA), continued pretraining, a Hugging Face
starting point, the evidence file, exact LoRA resume, bad input skipped and counted."""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from chatforge import stages
from chatforge.checkpoint import load_model, resolve_checkpoint
from chatforge.config import load_config
from chatforge.data.loader import IGNORE, SFTLoader
from chatforge.data.shards import open_shards
from chatforge.engine import Engine
from chatforge.errors import UserError
from chatforge.evidence import held_out
from chatforge.finetune import load_start, run_finetune
from chatforge.lora import load_adapter
from chatforge.paths import RunPaths
from chatforge.tokenizer import Tokenizer

NAMES = ["Ada", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kit", "Lu", "Max", "Ned", "Oz", "Pam"]
TINY = ["tokenizer.vocab_size=400", "model.n_layer=2", "model.n_head=2", "model.n_kv_head=1", "model.n_embd=32",
        "model.seq_len=64", "data.max_bytes=300000",
        "train.steps=30", "train.batch_size=8", "train.eval_every=0", "train.eval_batches=2", "train.warmup_steps=2",
        "train.lr=0.01", "train.device=cpu", "train.compile=off",
        "finetune.steps=40", "finetune.batch_size=8", "finetune.eval_every=20", "finetune.eval_batches=2",
        "finetune.warmup_steps=2", "finetune.lr=0.01", "finetune.device=cpu", "finetune.compile=off",
        "eval.max_batches=2", "generate.max_new_tokens=16",
        "train.precision=fp32", "finetune.precision=fp32"]  # thresholds below were set in fp32


pytestmark = pytest.mark.usefixtures("one_thread")


def _with(cfg, **settings):
    """A copy of cfg with these finetune.* settings (as --input/--init/--mode/--lora-* set them)."""
    c = copy.deepcopy(cfg)
    for key, value in settings.items():
        setattr(c.finetune, key, value)
    return c


def ft(cfg, paths, force: bool = False, resume: bool = False, **settings):
    return run_finetune(_with(cfg, **settings), paths, force=force, resume=resume)


def hello_records(n: int = 300) -> list[dict]:
    """Short, learnable chats: a model that learns them also learns to stop after the reply."""
    return [{"instruction": f"Say hello to {NAMES[i % len(NAMES)]}{i}.", "output": f"Hello, {NAMES[i % len(NAMES)]}{i}!"}
            for i in range(n)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """prepare (stdlib text + the hello chats) -> tokenizer -> encode -> 30 pretraining steps: about 3 s."""
    root = tmp_path_factory.mktemp("ft")
    chat = write_jsonl(root / "chat.jsonl", hello_records())
    cfg = load_config(None, TINY + [f"sft.inputs=[{chat}]"])
    paths = RunPaths(root / "base")
    stages.prepare(cfg, paths)
    stages.tokenizer(cfg, paths)
    stages.encode(cfg, paths)
    stages.pretrain(cfg, paths)
    return cfg, paths


def clone_run(base_run, tmp_path, *overrides: str):
    """A copy of the base run (so tests don't see each other's fine-tunes), with config overrides."""
    cfg, paths = base_run
    dst = RunPaths(tmp_path / "run")
    shutil.copytree(paths.root, dst.root, ignore=shutil.ignore_patterns("finetune"))
    return load_config(None, TINY + [f"sft.inputs=[{cfg.sft.inputs[0]}]", *overrides]), dst


def losses(metrics: Path) -> dict:
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {kind: {r["step"]: r[key] for r in recs if r["kind"] == kind} for kind, key in (("train", "loss"), ("val", "val_loss"))}


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_full_sft_writes_evidence(base_run, tmp_path):
    cfg, paths = clone_run(base_run, tmp_path)
    out = ft(cfg, paths, eval_prompts=10)
    ev = json.loads((paths.finetune / "finetune_eval.json").read_text())
    assert ev == json.loads(json.dumps(out["eval"], default=float))
    b, a = ev["before"], ev["after"]
    assert a["chat_val_loss"] < b["chat_val_loss"] - 1.0  # the chats are learnable
    assert a["domain_val_loss"] == a["chat_val_loss"]
    assert b["general_val_loss"] is not None and a["general_val_loss"] is not None  # forgetting is measured
    # Replies to held-out prompts: the base never stops, the fine-tuned model does.
    assert a["prompts"] == 10 and len(a["replies"]) == 10
    assert b["end_of_turn_share"] == 0.0 and a["end_of_turn_share"] >= 0.8  # sampled as `chat` does (seeded)
    assert b["end_of_turn_share_greedy"] == 0.0 and a["end_of_turn_share_greedy"] >= 0.8
    assert a["decoding"]["temperature"] == cfg.generate.temperature
    assert all(r["tokens"] <= 16 and r["tokens_greedy"] <= 16 for r in a["replies"])
    assert ev["data"]["train"]["examples"] > 200 and ev["lora"] is None
    # Later stages read the fine-tuned checkpoint unchanged: `chat` on it gives the recorded greedy replies.
    engine = Engine.from_run(paths.root, "finetune", device="cpu")
    for r in a["replies"]:
        got = engine.chat([{"role": "user", "content": r["prompt"]}], max_new_tokens=16, temperature=0.0)
        assert got == r["reply_greedy"], (r, got)


def test_lora_sft_adapter_merge_and_exact_resume(base_run, tmp_path):
    cfg, paths = clone_run(base_run, tmp_path, "finetune.schedule=constant", "finetune.warmup_steps=0",
                           "finetune.steps=6", "finetune.eval_every=3", "finetune.log_every=1")
    base_ckpt = resolve_checkpoint(paths.pretrain / "ckpt", "best")
    base_hash = sha(base_ckpt / "model.safetensors")
    ft(cfg, paths, lora_rank=4, lora_dropout=0.1, eval_prompts=2)
    straight = losses(paths.finetune / "metrics.jsonl")

    # The adapter alone, small; the merged model an ordinary checkpoint equal to base + adapter.
    ad = paths.finetune / "adapter"
    assert (ad / "adapter_model.safetensors").is_file() and (ad / "adapter_config.json").is_file()
    merged_ckpt = resolve_checkpoint(paths.finetune / "ckpt", "best")
    assert (ad / "adapter_model.safetensors").stat().st_size < (merged_ckpt / "model.safetensors").stat().st_size / 4
    merged, meta = load_model(merged_ckpt)
    assert meta["lora_merged"] and meta["lora"]["rank"] == 4
    base, _ = load_model(base_ckpt)
    with_adapter = load_adapter(base, ad).eval()
    x = torch.randint(7, 400, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), with_adapter(x), atol=1e-5, rtol=0)
    assert sha(base_ckpt / "model.safetensors") == base_hash  # the base checkpoint is untouched

    # Stop at step 3, resume to 6: the same losses as the straight run, bit for bit.
    cfg3, _ = clone_run(base_run, tmp_path / "x", "finetune.schedule=constant", "finetune.warmup_steps=0",
                        "finetune.steps=3", "finetune.eval_every=3", "finetune.log_every=1")
    ft(cfg3, paths, lora_rank=4, lora_dropout=0.1, eval_prompts=0, force=True)
    with pytest.raises(UserError, match="lora"):
        ft(cfg, paths, lora_rank=8, lora_dropout=0.1, eval_prompts=0, resume=True)
    ft(cfg, paths, lora_rank=4, lora_dropout=0.1, eval_prompts=0, resume=True)
    resumed = losses(paths.finetune / "metrics.jsonl")
    assert sorted(resumed["train"]) == [1, 2, 3, 4, 5, 6] and resumed == straight
    # A full fine-tune cannot "resume" the merged LoRA checkpoint.
    with pytest.raises(UserError, match="merged LoRA"):
        ft(cfg, paths, resume=True, eval_prompts=0)


def test_continued_pretraining_on_domain_text(base_run, tmp_path):
    cfg, paths = clone_run(base_run, tmp_path, "finetune.steps=30", "data.val_fraction=0.2")
    domain = tmp_path / "domain"
    domain.mkdir()
    for i in range(20):  # a narrow "domain": a recipe-like register, learnable in a few steps
        (domain / f"doc{i}.txt").write_text("\n".join(
            f"Step {k}: stir the {['soup', 'sauce', 'dough'][(i + k) % 3]} for {k + i} minutes, then add salt."
            for k in range(30)))
    out = ft(cfg, paths, mode="cpt", inputs=[str(domain)], eval_prompts=3)
    ev = out["eval"]
    assert ev["mode"] == "cpt"
    # The domain documents were encoded for training, each whole, split between train and val.
    tok = Tokenizer.load(paths.tokenizer)
    got = {}
    for split in ("train", "val"):
        got[split] = []
        for sh in open_shards(paths.finetune / "tokens" / split, tok_hash=tok.hash):
            ends = list(sh.doc_starts[1:]) + [len(sh.tokens)]
            got[split] += [tok.decode(sh.tokens[s + 1:e].tolist()) for s, e in zip(sh.doc_starts, ends)]
    assert sorted(got["train"] + got["val"]) == sorted((domain / f"doc{i}.txt").read_text() for i in range(20))
    assert got["train"] and got["val"]
    assert ev["after"]["domain_val_loss"] < ev["before"]["domain_val_loss"] - 0.5
    assert ev["after"]["general_val_loss"] is not None and ev["after"]["chat_val_loss"] is not None
    assert load_model(resolve_checkpoint(paths.finetune / "ckpt", "best"))[1]["mode"] == "cpt"
    with pytest.raises(UserError, match="domain text"):
        ft(cfg, paths, mode="cpt", force=True)
    with pytest.raises(UserError, match="mode"):
        ft(cfg, paths, mode="ppo", force=True)


def hf_dir_from(tok_dir: Path, out: Path, arch: str) -> Path:
    """A tiny randomly initialised transformers model saved locally, with our tokenizer files."""
    import transformers

    tok = Tokenizer.load(tok_dir)
    common = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                  bos_token_id=0, eos_token_id=6, pad_token_id=2, tie_word_embeddings=arch == "llama")
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **common))
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / f, out / f)
    return out, model.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_hf_starting_point_identical_logits(base_run, tmp_path, arch):
    cfg, paths = base_run
    hf_dir, hf_model = hf_dir_from(paths.tokenizer, tmp_path / "hf", arch)
    fresh = RunPaths(tmp_path / "fresh")  # a run with no tokenizer yet: the HF folder's becomes the run's
    model, tok, src, kind = load_start(_with(cfg, init_from=str(hf_dir)), fresh)
    assert kind == "hf" and (fresh.tokenizer / "tokenizer.json").is_file() and tok.hash == Tokenizer.load(paths.tokenizer).hash
    x = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_model(x).logits, atol=1e-5, rtol=1e-5)
    if arch == "llama":  # fine-tune it end to end (chat data given with --input)
        c = load_config(None, TINY + ["finetune.steps=4", "finetune.eval_every=0"])
        out = ft(c, fresh, init_from=str(hf_dir), inputs=cfg.sft.inputs, eval_prompts=2)
        assert out["eval"]["init_kind"] == "hf" and out["eval"]["before"]["general_val_loss"] is None
        assert Engine.from_run(fresh.root, "finetune", device="cpu").model.cfg.n_embd == 32


def test_hf_tokenizer_that_disagrees_with_its_files_is_refused(base_run, tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers, trainers

    cfg, paths = base_run
    hf_dir, _ = hf_dir_from(paths.tokenizer, tmp_path / "hf", "llama")
    foreign = HFTok(models.BPE())
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel()
    foreign.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"]))
    foreign.save(str(hf_dir / "tokenizer.json"))
    with pytest.raises(UserError, match="is not in"):  # its tokenizer_config.json names <|bos|>, absent here
        load_start(_with(cfg, init_from=str(hf_dir)), RunPaths(tmp_path / "fresh"))


def test_held_out_prompts_spread_over_the_sources(tmp_path):
    val = tmp_path / "sft_val.jsonl"
    recs = [{"messages": [{"role": "user", "content": f"{src} {i}"}, {"role": "assistant", "content": "a"}]}
            for src in ("alpaca", "gsm8k") for i in range(10)]
    val.write_text("".join(json.dumps(r) + "\n" for r in recs))
    prompts = [it["messages"] for it in held_out(val, 4)]
    assert [p[-1]["content"] for p in prompts] == ["alpaca 0", "alpaca 5", "gsm8k 0", "gsm8k 5"]
    assert len(held_out(val, 50)) == 20


def test_bad_chat_input_is_skipped_and_counted(base_run, tmp_path):
    cfg, paths = clone_run(base_run, tmp_path, "finetune.steps=2", "finetune.eval_every=0")
    long = " ".join(["word"] * 200)  # far longer than the 64-token context
    bad = [
        {"messages": []},
        {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},  # order
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 42}]},  # non-string
        {"messages": [{"role": "user", "content": "Tell me a long story."}, {"role": "assistant", "content": long}]},
        {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "ok"}]},  # no room
    ]
    f = write_jsonl(tmp_path / "mixed.jsonl", bad + hello_records(40))
    ev = ft(cfg, paths, inputs=[str(f)], eval_prompts=0)["eval"]
    assert ev["data"]["skipped"] == {"bad_order": 1, "empty": 1, "no_assistant": 1, "non_string_content": 1}
    tr, va = ev["data"]["train"], ev["data"]["val"]
    assert tr["truncated"] + va["truncated"] == 2  # both long conversations were over the context ...
    assert tr["dropped"] + va["dropped"] == 2  # ... and no whole reply of theirs fits: dropped, not cut mid-reply
    assert tr["examples"] + va["examples"] == 40

    only_bad = write_jsonl(tmp_path / "bad.jsonl", bad[:4])
    with pytest.raises(UserError, match="no usable chat examples") as e:
        ft(cfg, paths, inputs=[str(only_bad)], force=True)
    assert "\n" not in str(e.value)


def test_end_of_turn_is_a_training_target_in_loader_batches(base_run):
    _, paths = base_run
    tok = Tokenizer.load(paths.tokenizer)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye now."}]
    ids, mask = tok.render_chat(msgs)
    for pack in (True, False):
        batch = SFTLoader([(ids, mask), (ids, mask)], 1, 64, pad_id=tok.pad_id, pack=pack).next_batch()
        x, y = batch["x"][0].tolist(), batch["y"][0].tolist()
        # Position i predicts ids[i + 1]: every <|end|> that closes an assistant turn is a target ...
        closes = [i for i in range(len(ids) - 1) if ids[i + 1] == tok.end_id]
        assistant_ends = [i for i in closes if mask[i + 1]]
        assert len(closes) == 5 and len(assistant_ends) == 2
        for i in assistant_ends:
            assert x[i] == ids[i] and y[i] == tok.end_id
        # ... while the <|end|> of system and user turns is not.
        for i in set(closes) - set(assistant_ends):
            assert y[i] == IGNORE


def test_rouge_l_scores_overlap():
    from chatforge.evidence import rouge_l
    assert rouge_l("Return the sum of a and b.", "Return the sum of a and b.") == 1.0
    assert rouge_l("completely different words", "Return the sum of a and b.") == 0.0
    assert 0.3 < rouge_l("Return the sum.", "Return the sum of a and b.") < 1.0
