"""Benchmark loading, schema errors, multiple-choice and GSM8K scoring."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

from chatforge import tasks as bm
from chatforge.config import ModelConfig, TokenizerConfig
from chatforge.errors import UserError
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer

FACTS = "the cat sat on the mat. the dog ran in the park. the bird flew over the tree. "


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([FACTS + "abcdefghijklmnopqrstuvwxyz?:!é\n"], TokenizerConfig(kind="char"))


def tiny_gpt(vocab: int, seq_len: int = 48, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_kv_head=2, n_embd=48, seq_len=seq_len, vocab_size=vocab))


@pytest.fixture(scope="module")
def memorised(tok) -> GPT:
    """A tiny GPT trained until it has memorised FACTS (BOS + text, as score_multiple_choice presents it)."""
    model = tiny_gpt(tok.vocab_size)
    stream = [tok.bos_id] + tok.encode(FACTS * 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    T = 40
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and does not fight other processes
    try:
        _train(model, opt, stream, rng, T)
    finally:
        torch.set_num_threads(threads)
    return model


def _train(model, opt, stream, rng, T):
    for _ in range(300):
        starts = [0] + [rng.randrange(0, len(stream) - T - 1) for _ in range(7)]
        x = torch.tensor([stream[s:s + T] for s in starts])
        y = torch.tensor([stream[s + 1:s + T + 1] for s in starts])
        loss = F.cross_entropy(model(x).transpose(1, 2), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3, "the tiny model failed to memorise the text"


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_memorised_model_picks_the_right_ending(memorised, tok):
    items = [
        {"context": "the cat sat on the", "endings": [" park.", " mat.", " tree."], "label": 1},
        {"context": "the dog ran in the", "endings": [" park.", " mat.", " tree."], "label": 0},
        {"context": "the bird flew over the", "endings": [" mat.", " park.", " tree."], "label": 2},
        {"context": "the cat", "endings": [" flew over the tree.", " sat on the mat."], "label": 1},
    ]
    res = bm.score_multiple_choice(memorised, tok, items)
    assert res["n"] == 4
    assert res["acc"] == 1.0 and res["acc_norm"] == 1.0
    assert res["random_baseline"] == pytest.approx((3 * (1 / 3) + 1 / 2) / 4)


def independent_loglik(model, tok, context: str, ending: str, move_space: bool = False) -> float:
    if move_space:  # lm-evaluation-harness moves the context's trailing whitespace onto the continuation
        n = len(context) - len(context.rstrip())
        context, ending = context[:len(context) - n], context[len(context) - n:] + ending
    ctx = [tok.bos_id] + tok.encode(context)
    cont = tok.encode(ending)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ctx + cont]))[0].double(), -1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_scores_match_independent_loglikelihood(tok):
    model = tiny_gpt(tok.vocab_size, seed=3)
    with torch.no_grad():  # a sharper random model, so choices differ clearly
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8)
    rng = random.Random(1)
    alphabet = "abcdefghijklmnopqrstuvwxyz "
    items = []
    for _ in range(12):
        endings = [" " + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(4)]
        items.append({"context": "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 20))),
                      "endings": endings, "label": rng.randrange(4)})
    items[1]["context"] += "  "  # trailing spaces move to the continuation (as lm-evaluation-harness)
    # Requests straight through continuation_logprobs (batched, padded) equal one-at-a-time forwards.
    reqs = [([tok.bos_id] + tok.encode(it["context"]), tok.encode(e)) for it in items for e in it["endings"]]
    lls = bm.continuation_logprobs(model, reqs, batch_size=5)
    ref = [independent_loglik(model, tok, it["context"], e) for it in items for e in it["endings"]]
    assert lls == pytest.approx(ref, rel=1e-5, abs=1e-5)

    ref = [independent_loglik(model, tok, it["context"], e, move_space=True) for it in items for e in it["endings"]]
    res = bm.score_multiple_choice(model, tok, items, batch_size=7)
    hits = hits_norm = 0
    for i, (it, pred) in enumerate(zip(items, res["predictions"])):
        ll = ref[4 * i:4 * i + 4]
        assert pred["lls"] == pytest.approx(ll, rel=1e-5, abs=1e-5)
        norm = [v / len(e[1:]) for v, e in zip(ll, it["endings"])]  # characters, without the " " delimiter
        assert pred["pred"] == max(range(4), key=ll.__getitem__)
        assert pred["pred_norm"] == max(range(4), key=norm.__getitem__)
        hits += pred["pred"] == it["label"]
        hits_norm += pred["pred_norm"] == it["label"]
    assert res["acc"] == hits / 12 and res["acc_norm"] == hits_norm / 12
    assert any(p["pred"] != p["pred_norm"] for p in res["predictions"])  # normalisation matters here
    assert res["acc_se"] == pytest.approx((res["acc"] * (1 - res["acc"]) / 11) ** 0.5)


def test_long_context_is_cut_from_the_left(memorised, tok):
    long_ctx = "the dog ran in the park. " * 5 + "the cat sat on the"  # longer than seq_len 48
    item = {"context": long_ctx, "endings": [" park.", " mat."], "label": 1}
    res = bm.score_multiple_choice(memorised, tok, [item])
    assert res["n"] == 1 and res["acc"] == 1.0


def test_wrong_schema_names_file_line_and_field(tmp_path):
    good = {"ctx": "a", "endings": ["b", "c"], "label": 0}
    path = write_jsonl(tmp_path / "hs.jsonl", [good, {"ctx": "a", "ending": ["b"], "label": 0}])
    with pytest.raises(UserError) as e:
        bm.load_items(path, "hellaswag")
    msg = str(e.value)
    assert str(path) in msg and "line 2" in msg and "'endings'" in msg and "missing" in msg

    path = write_jsonl(tmp_path / "lab.jsonl", [good, good, {"ctx": "a", "endings": ["b", "c"], "label": 5}])
    with pytest.raises(UserError, match=r"line 3: field 'label' is 5"):
        bm.load_items(path, "hellaswag")

    path = write_jsonl(tmp_path / "bad.jsonl", [good, "{not json"])
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        bm.load_items(path, "hellaswag")

    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(UserError, match=r"line 1: field 'answer'"):
        bm.load_items(path, "gsm8k")

    with pytest.raises(UserError, match="unknown benchmark schema"):
        bm.load_items(path, "mmlu")


def test_empty_or_missing_file_is_a_user_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="no records"):
        bm.load_items(empty, "arc")
    with pytest.raises(UserError, match="not found"):
        bm.load_items(tmp_path / "nope.jsonl", "arc")


def test_arc_choice_layouts(tmp_path):
    recs = [
        {"question": "2+2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B"},
        {"question": "sky?", "choices": [{"text": "blue", "label": "1"}, {"text": "red", "label": "2"}],
         "answerKey": "1"},
        {"question": "x?", "choices": ["p", "q", "r"], "answerKey": "C"},
    ]
    items = bm.load_items(write_jsonl(tmp_path / "arc.jsonl", recs), "arc")
    assert [it["label"] for it in items] == [1, 0, 2]
    assert items[0]["context"] == "Question: 2+2?\nAnswer:" and items[0]["endings"] == [" 3", " 4"]
    bad = write_jsonl(tmp_path / "arc_bad.jsonl", [dict(recs[0], answerKey="E")])
    with pytest.raises(UserError, match="answerKey"):
        bm.load_items(bad, "arc")
    as_json = tmp_path / "arc.json"
    as_json.write_text(json.dumps(recs))
    assert len(bm.load_items(as_json, "arc")) == 3


def test_hellaswag_raw_record_cleanup(tmp_path):
    rec = {"activity_label": "Roof shingle removal", "ctx": "A man is on a roof. [header] he",
           "ctx_a": "A man is on a roof. [header]", "ctx_b": "he", "endings": ["is [title] here.", "goes  home."],
           "label": 1}
    (item,) = bm.load_items(write_jsonl(tmp_path / "h.jsonl", [rec]), "hellaswag")
    # As lm-evaluation-harness: activity_label + ": " + ctx_a + " " + ctx_b.capitalize(), then cleaned.
    assert item["context"] == "Roof shingle removal: A man is on a roof. He"
    assert item["endings"] == [" is. here.", " goes home."]
    del rec["ctx_a"], rec["ctx_b"]  # a record with only ctx keeps it as it is
    (item,) = bm.load_items(write_jsonl(tmp_path / "h2.jsonl", [rec]), "hellaswag")
    assert item["context"] == "Roof shingle removal: A man is on a roof. he"


@pytest.mark.parametrize("text,num", [
    ("so she has 5 apples.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("the answer is $18.00.", "18"),
    ("first 3 then 4.5 and finally -7", "-7"),
    ("no number here", None),
    ("#### 0.50", "0.5"),
])
def test_extract_answer(text, num):
    assert bm.extract_answer(text) == num


class LookupEngine:
    """A stand-in for Engine.chat that replies from a table (scoring logic only; Engine is tested elsewhere)."""

    def __init__(self, replies: dict[str, str]):
        self.replies = replies
        self.calls = []

    def chat(self, messages, max_new_tokens, temperature=0):
        self.calls.append((messages, max_new_tokens, temperature))
        return self.replies[messages[-1]["content"]]


def test_gsm8k_exact_match(tmp_path):
    recs = [{"question": f"q{i}", "answer": f"work...\n#### {a}"} for i, a in enumerate(["72", "1,000", "5", "9"])]
    items = bm.load_items(write_jsonl(tmp_path / "g.jsonl", recs), "gsm8k")
    engine = LookupEngine({"q0": "48+24 = 72\n#### 72", "q1": "It costs $1000.", "q2": "#### 6 (not 5)",
                           "q3": "I do not know"})
    res = bm.score_gsm8k(engine, None, items, max_new_tokens=64)
    assert res["n"] == 4 and res["exact_match"] == 0.5
    assert [s["pred"] for s in res["samples"]] == ["72", "1000", "6", None]
    assert all(c[1] == 64 and c[2] == 0 for c in engine.calls)
    assert bm.score_gsm8k(engine, None, items, max_items=1)["n"] == 1


def test_gsm8k_with_real_engine(tok):
    from chatforge.engine import Engine

    model = tiny_gpt(tok.vocab_size, seq_len=64)
    items = [{"question": "the cat sat on the mat?", "answer": "#### 3", "gold": "3"}]
    res = bm.score_gsm8k(Engine(model, tok), tok, items, max_new_tokens=8)
    assert res["n"] == 1 and isinstance(res["samples"][0]["reply"], str)


def test_registry_and_yaml(tmp_path):
    data = write_jsonl(tmp_path / "mine.jsonl", [{"ctx": "a", "endings": ["b", "c"], "label": 0}])
    cfg = tmp_path / "benchmarks.yaml"
    cfg.write_text("tasks:\n  mine: {path: mine.jsonl, schema: hellaswag}\n")
    try:
        assert bm.load_benchmarks_yaml(cfg) == ["mine"]
        assert bm.TASKS["mine"] == bm.TaskSpec(data, "hellaswag")
        assert "hellaswag" in bm.TASKS and bm.TASKS["gsm8k"].schema == "gsm8k"
        with pytest.raises(UserError, match="unknown benchmark 'nope'"):
            bm.get_task("nope")
        cfg.write_text("tasks:\n  other: {path: x.jsonl, schema: squad}\n")
        with pytest.raises(UserError, match="unknown schema 'squad'"):
            bm.load_benchmarks_yaml(cfg)
    finally:
        bm.TASKS.pop("mine", None)


def test_shared_hellaswag_sample(shared_data, tok):
    items = bm.load_items(shared_data / "hellaswag" / "hellaswag_val_sample1000_raw.jsonl", "hellaswag")
    assert len(items) == 1000 and all(len(it["endings"]) == 4 for it in items)
    assert all("[" not in it["context"] for it in items[:100])
    char = Tokenizer.train([it["context"] + "".join(it["endings"]) for it in items[:20]],
                           TokenizerConfig(kind="char"))
    res = bm.score_multiple_choice(tiny_gpt(char.vocab_size, seq_len=256), char, items, max_items=8)
    assert res["n"] == 8 and res["random_baseline"] == pytest.approx(0.25)
