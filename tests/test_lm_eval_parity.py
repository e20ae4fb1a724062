"""`chatforge eval --task` multiple choice agrees with lm-evaluation-harness (`--model hf`) item by item.

A tiny random chatforge model is exported to a Hugging Face folder and scored by lm-eval's HFLM on the
requests its multiple-choice tasks build: (context, " " + choice). Per-choice log-likelihoods must agree
within 1e-4 and acc / acc_norm (lm-eval's process_results: argmax of ll and of ll / len(choice)) item by item.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chatforge import tasks as bm
from chatforge.config import ModelConfig, TokenizerConfig
from chatforge.export import export_hf
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # lm-eval's hf model needs it: install "lm-eval[hf]"
pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?",
          "Once upon a time there was a little model that wanted to talk.",
          "A man is sitting on a roof. He starts pulling up roofing. Café, naïve, über, señor."] * 5
SEQ_LEN = 64

# HellaSwag-style (context, choices, label); lm-eval's continuation is target_delimiter " " + choice.
ITEMS = [
    ("Roof shingle removal: A man is sitting on a roof. He",
     ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "starts pulling up roofing."], 2),
    ("The quick brown fox ", ["jumps over the lazy dog.", "says hello.", "is a fox."], 0),  # trailing space
    ("Hello world,   ", ["how are you today?", "hello", "world"], 0),  # several trailing spaces
    ("Once upon a time\n", ["there was a model.", "the end.", "über café"], 1),  # trailing newline
    ("A man visits a café and", ["orders a crème brûlée.", "says naïve things 🙂.", "leaves."], 2),  # non-ASCII
    ("Señor Ünïcödé", ["über", "ü", "ÜÜÜÜÜÜ ÜÜÜ"], 1),  # characters != bytes: acc_norm by characters
    ("The lazy dog", ["", ".", "sleeps."], 1),  # empty-ish choices: " " alone, one character
    ("Hello", ["!", "?", " world"], 2),  # a choice that itself starts with a space
    ("", ["The quick brown fox.", "Hello world.", "Once upon a time."], 0),  # empty context: BOS prefix
    ("The quick brown fox jumps over the lazy dog. " * 4 + "Once upon a",  # longer than the context window
     ["time there was a little model.", "dog.", "roof"], 0),
    ("How are you today? I am", ["fine", "fine.", "fine, thanks."], 0),
    # Short choices whose characters, bytes and " " + choice lengths rank differently under normalisation.
    ("Señor", ["ü", "ab", "o", "über"], 0),
    ("The café", ["é", "ee", "the", "crème"], 1),
    ("A man is", ["ñ", "on", "a", "naïve"], 2),
    ("Once upon a", ["time", "tï", "übër", "t"], 3),
]


def export_tiny(tok_dir, out_dir, seed=0, init_std=0.1):
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=SEQ_LEN,
                            vocab_size=tok.vocab_size, init_std=init_std)).eval()
    return model, tok, export_hf(model, tok_dir, out_dir)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    Tokenizer.train(CORPUS, TokenizerConfig(kind="bpe", vocab_size=320, min_frequency=1)).save(root / "tok")
    return export_tiny(root / "tok", root / "hf")


@pytest.fixture(scope="module")
def exported_cross_space(tmp_path_factory):
    """A byte-level BPE with no split regex: merges cross spaces (as in many imported tokenizers), so
    encoding context + continuation together and splitting differs from encoding the continuation alone."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from chatforge.chat_format import SPECIAL_TOKENS

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=400, min_frequency=1, special_tokens=[AddedToken(t, special=True) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    root = tmp_path_factory.mktemp("parity_cross")
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer.json").write_text(hf.to_str(), encoding="utf-8")
    return export_tiny(root / "tok", root / "hf", seed=2)


def make_hflm(folder, **kw):
    """lm-eval's `--model hf` on a local folder, with the Hub switched off (nothing may reach the network)."""
    import huggingface_hub.constants as hub_constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=str(folder), device="cpu", batch_size=4, dtype="float32", **kw)


@pytest.fixture(scope="module")
def hflm_bos(exported):
    return make_hflm(exported[2], add_bos_token=True)


def lm_eval_scores(lm, items) -> list[dict]:
    """Per item: lls, pred, pred_norm, as lm-eval's multiple_choice construct_requests + process_results."""
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(ctx, " " + c), idx=i)
            for ctx, choices, _ in items for i, c in enumerate(choices)]
    out = [ll for ll, _greedy in lm.loglikelihood(reqs, disable_tqdm=True)]
    res, at = [], 0
    for _, choices, label in items:
        lls = np.array(out[at:at + len(choices)])
        at += len(choices)
        completion_len = np.array([float(len(c)) for c in choices])
        with np.errstate(divide="ignore", invalid="ignore"):
            pred_norm = int(np.argmax(lls / completion_len))
        res.append({"lls": lls.tolist(), "pred": int(np.argmax(lls)), "pred_norm": pred_norm,
                    "acc": float(np.argmax(lls) == label), "acc_norm": float(pred_norm == label)})
    return res


def chatforge_scores(model, tok, items) -> dict:
    mc = [{"context": ctx, "endings": [" " + c for c in choices], "label": label} for ctx, choices, label in items]
    return bm.score_multiple_choice(model, tok, mc, batch_size=5)


def assert_same(ours: dict, theirs: list[dict]):
    assert len(ours["predictions"]) == len(theirs)
    for n, (p, t) in enumerate(zip(ours["predictions"], theirs)):
        assert p["lls"] == pytest.approx(t["lls"], abs=1e-4), f"item {n}: log-likelihoods differ"
        assert (p["pred"], p["pred_norm"]) == (t["pred"], t["pred_norm"]), f"item {n}: picks differ"
        assert float(p["pred"] == p["label"]) == t["acc"] and float(p["pred_norm"] == p["label"]) == t["acc_norm"]
    assert ours["acc"] == pytest.approx(np.mean([t["acc"] for t in theirs]))
    assert ours["acc_norm"] == pytest.approx(np.mean([t["acc_norm"] for t in theirs]))


def test_items_are_tricky_enough(exported):
    _, tok, _ = exported
    # The long item is cut from the left in both; some choice's bytes differ from its characters.
    assert max(len(tok.encode(ctx)) for ctx, _, _ in ITEMS) > SEQ_LEN
    assert any(len(c) != len(c.encode()) for _, cs, _ in ITEMS for c in cs)


def test_matches_lm_eval_with_bos(exported, hflm_bos):
    """chatforge tokenizers prepend BOS: lm-eval must be told so (add_bos_token=True)."""
    model, tok, _ = exported
    assert getattr(tok, "add_bos", True)
    ours = chatforge_scores(model, tok, ITEMS)
    theirs = lm_eval_scores(hflm_bos, ITEMS)
    assert_same(ours, theirs)
    # The normalisation is not a no-op on these items, and dividing by the bytes of " " + choice (not
    # lm-eval's len(choice)) would pick differently on some item: acc_norm's divisor is really tested.
    assert any(t["pred"] != t["pred_norm"] for t in theirs)
    by_bytes = [int(np.argmax(np.array(t["lls"]) / [len((" " + c).encode()) for c in cs]))
                for t, (_, cs, _) in zip(theirs, ITEMS)]
    assert any(b != t["pred_norm"] for b, t in zip(by_bytes, theirs))


def test_matches_lm_eval_when_merges_cross_spaces(exported_cross_space):
    model, tok, folder = exported_cross_space
    # The joint encode-and-split matters for this tokenizer (else this test would show nothing).
    # Where context + continuation encodes to no more tokens than the context alone ("dog" + " " -> "dog ",
    # "upon a" + " time" -> "upon a time"), the continuation is empty and lm-eval rejects the request: leave
    # those items out.
    items = [(ctx, cs, label) for ctx, cs, label in ITEMS
             if not ctx or all(len(tok.encode(ctx.rstrip() + ctx[len(ctx.rstrip()):] + " " + c))
                               > len(tok.encode(ctx.rstrip())) for c in cs)]
    assert len(items) >= 10
    split_differs = [tok.encode(ctx + " " + c)[len(tok.encode(ctx)):] != tok.encode(" " + c)
                     for ctx, cs, _ in items if ctx and ctx == ctx.rstrip() for c in cs]
    assert any(split_differs)
    assert_same(chatforge_scores(model, tok, items), lm_eval_scores(make_hflm(folder, add_bos_token=True), items))


class NoBosTokenizer:
    """A tokenizer whose model expects no BOS (as imported tokenizers may say through `add_bos`)."""

    add_bos = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_matches_lm_eval_without_bos(exported):
    model, tok, folder = exported
    lm = make_hflm(folder)  # the exported tokenizer_config says add_bos_token false: lm-eval adds none
    ours = chatforge_scores(model, NoBosTokenizer(tok), ITEMS)
    assert_same(ours, lm_eval_scores(lm, ITEMS))
    # ... and that differs from the BOS run: the README's command must pass add_bos_token=True.
    with_bos = chatforge_scores(model, tok, ITEMS)
    assert max(abs(a - b) for p, q in zip(ours["predictions"], with_bos["predictions"])
               for a, b in zip(p["lls"], q["lls"])) > 1e-3


@pytest.mark.slow
def test_real_hellaswag_items_match_lm_eval_task(tmp_path, exported, shared_data):
    """50 real HellaSwag records through lm-eval's own hellaswag task (process_docs, construct_requests,
    process_results) and through `load_items` + score_multiple_choice."""
    path = shared_data / "hellaswag" / "hellaswag_val_sample1000_raw.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    pytest.importorskip("datasets")
    n = 50
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:n]]
    items = bm.load_items(path, "hellaswag")[:n]

    # A tokenizer that knows this text and a model whose window holds the items, exported.
    texts = [it["context"] + "".join(it["endings"]) for it in items]
    tok_dir = tmp_path / "tok"
    Tokenizer.train(texts, TokenizerConfig(kind="bpe", vocab_size=600, min_frequency=1)).save(tok_dir)
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=256,
                            vocab_size=tok.vocab_size, init_std=0.1)).eval()
    lm = make_hflm(export_hf(model, tok_dir, tmp_path / "hf"), add_bos_token=True)

    # lm-eval's hellaswag task, reading the local records instead of the Hub dataset.
    import datasets
    from lm_eval.tasks.hellaswag import utils as hs_utils

    docs = hs_utils.process_docs(datasets.Dataset.from_list(recs))
    theirs_items = [(d["query"], d["choices"], d["gold"]) for d in docs]
    assert [(it["context"], [e[1:] for e in it["endings"]], it["label"]) for it in items] == theirs_items

    ours = bm.score_multiple_choice(model, tok, items, batch_size=8)
    theirs = lm_eval_scores(lm, theirs_items)
    assert_same(ours, theirs)
