"""LM metrics checked against independent plain-PyTorch computations."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chatforge.config import ModelConfig, TokenizerConfig
from chatforge.evaluate import evaluate_lm, evaluate_text, sliding_windows
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity. ")


def tiny_gpt(vocab: int, seq_len: int = 32, tie: bool = True, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, seq_len=seq_len, vocab_size=vocab,
                      tie_embeddings=tie, init_std=0.2)  # large init: peaked, non-uniform predictions
    return GPT(cfg)


@pytest.fixture(scope="module")
def char_tok() -> Tokenizer:
    return Tokenizer.train([TEXT * 3, "é€ 日本"], TokenizerConfig(kind="char"))


def random_batches(vocab: int, n: int = 3, B: int = 4, T: int = 16, ignore_frac: float = 0.2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (B, T), generator=g)
        y = torch.randint(0, vocab, (B, T), generator=g)
        y[torch.rand(B, T, generator=g) < ignore_frac] = -100
        out.append({"x": x, "y": y})
    return out


def test_matches_plain_pytorch():
    vocab = 50
    model = tiny_gpt(vocab)
    batches = random_batches(vocab)
    res = evaluate_lm(model, batches)

    # Independent computation: one big cross-entropy over all kept targets.
    with torch.no_grad():
        logits = torch.cat([model(b["x"]) for b in batches]).reshape(-1, vocab)
    y = torch.cat([b["y"] for b in batches]).reshape(-1)
    keep = y != -100
    lg, tg = logits[keep].double(), y[keep]
    loss = F.cross_entropy(lg, tg).item()
    acc = (lg.argmax(-1) == tg).double().mean().item()
    top5 = (lg.topk(5, -1).indices == tg[:, None]).any(-1).double().mean().item()

    assert res["tokens"] == int(keep.sum())
    assert res["loss"] == pytest.approx(loss, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert res["acc"] == pytest.approx(acc, abs=1e-12)
    assert res["top5"] == pytest.approx(top5, abs=1e-12)
    assert 0 < res["acc"] < res["top5"] < 1  # the random model is neither useless nor perfect here
    assert "bpb" not in res
    assert model.training  # restored


def test_big_batches_are_scored_a_few_rows_at_a_time_with_the_same_numbers(monkeypatch):
    """A batch whose fp32 logits exceed evaluate.LOGITS_BYTES is scored in row chunks: every number equal."""
    import chatforge.evaluate as ev
    vocab = 50
    model = tiny_gpt(vocab)
    batches = random_batches(vocab, B=5)
    whole = evaluate_lm(model, batches, token_bytes=np.ones(vocab))
    calls = []
    real = ev.forward_at_targets
    monkeypatch.setattr(ev, "forward_at_targets", lambda m, b: calls.append(b["x"].shape[0]) or real(m, b))
    monkeypatch.setattr(ev, "LOGITS_BYTES", 2 * 16 * vocab * 4)  # two rows of (16, 50) fp32 logits
    parts = evaluate_lm(model, batches, token_bytes=np.ones(vocab))
    assert calls == [2, 2, 1] * 3
    for k in whole:
        assert parts[k] == pytest.approx(whole[k], rel=1e-6, nan_ok=True), k


def test_standard_error_equal_rows_is_se_of_row_means():
    vocab = 40
    model = tiny_gpt(vocab)
    batches = random_batches(vocab, ignore_frac=0.0)
    res = evaluate_lm(model, batches)
    with torch.no_grad():
        rows = torch.cat([F.cross_entropy(model(b["x"]).transpose(1, 2), b["y"], reduction="none").mean(1)
                          for b in batches]).double().numpy()
    assert res["loss_se"] == pytest.approx(rows.std(ddof=1) / math.sqrt(len(rows)), rel=1e-6)
    assert res["sequences"] == len(rows)


def test_uniform_model_bits_per_byte():
    vocab = 64
    model = tiny_gpt(vocab, tie=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: p = 1/V for every token
    token_bytes = np.arange(vocab) % 4  # some tokens 0 bytes (like specials), others 1..3
    batches = random_batches(vocab, n=2)
    res = evaluate_lm(model, batches, token_bytes=token_bytes)
    ys = torch.cat([b["y"] for b in batches]).reshape(-1)
    ys = ys[ys != -100].numpy()
    nbytes = int(token_bytes[ys].sum())
    assert res["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert res["bytes"] == nbytes
    assert res["bpb"] == pytest.approx(math.log2(vocab) * len(ys) / nbytes, rel=1e-6)
    assert res["loss_se"] == pytest.approx(0.0, abs=1e-6)


def test_no_targets_is_an_error():
    model = tiny_gpt(10)
    with pytest.raises(ValueError):
        evaluate_lm(model, [{"x": torch.zeros(1, 4, dtype=torch.long), "y": torch.full((1, 4), -100)}])


@pytest.mark.parametrize("n,seq_len,stride", [(1, 4, 4), (2, 4, 4), (10, 4, 4), (10, 4, 1), (37, 8, 3), (9, 8, 8)])
def test_windows_score_each_target_once(n, seq_len, stride):
    scored = []
    for start, end, first in sliding_windows(n, seq_len, stride):
        assert end - 1 - start <= seq_len  # model input never exceeds the context
        assert start < first <= end
        scored += list(range(first, end))
    assert scored == list(range(1, n))


def test_stride_equal_seq_len_is_non_overlapping(char_tok):
    seq_len = 16
    model = tiny_gpt(char_tok.vocab_size, seq_len=seq_len)
    texts = [TEXT, TEXT[:50] + "é€", TEXT[::-1]]
    res = evaluate_text(model, char_tok, texts, seq_len=seq_len, stride=seq_len, batch_size=3)

    # The same thing built by hand: disjoint chunks x = ids[i:i+T], y = ids[i+1:i+T+1], padded with -100.
    batches = []
    for t in texts:
        ids = char_tok.encode(t)
        for i in range(0, len(ids) - 1, seq_len):
            x = ids[i:i + seq_len]
            y = ids[i + 1:i + seq_len + 1]
            batches.append({"x": torch.tensor([x + [0] * (seq_len - len(x))]),
                            "y": torch.tensor([y + [-100] * (seq_len - len(y))])})
    ref = evaluate_lm(model, batches, token_bytes=char_tok.token_bytes_lengths())
    assert res["tokens"] == ref["tokens"] == sum(len(char_tok.encode(t)) - 1 for t in texts)
    for k in ("loss", "acc", "top5", "bpb", "loss_se"):
        assert res[k] == pytest.approx(ref[k], rel=1e-5), k
    # bpb uses the real UTF-8 bytes of the scored text (everything after each document's first character).
    assert res["bytes"] == sum(len(t.encode()) - len(t[0].encode()) for t in texts)


def test_stride_one_gives_full_context_to_every_token(char_tok):
    seq_len = 8
    model = tiny_gpt(char_tok.vocab_size, seq_len=seq_len)
    ids = char_tok.encode(TEXT[:30])
    res = evaluate_text(model, char_tok, [TEXT[:30]], seq_len=seq_len, stride=1)
    assert res["tokens"] == len(ids) - 1
    # Independent: token t predicted from the (up to) seq_len tokens before it.
    nll = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            ctx = torch.tensor([ids[max(0, t - seq_len):t]])
            nll.append(-F.log_softmax(model(ctx)[0, -1].double(), -1)[ids[t]].item())
    assert res["loss"] == pytest.approx(float(np.mean(nll)), rel=1e-5)
    # Different strides score the same tokens but with different context.
    mid = evaluate_text(model, char_tok, [TEXT[:30]], seq_len=seq_len, stride=3)
    assert mid["tokens"] == res["tokens"]
    assert mid["loss"] != pytest.approx(res["loss"], rel=1e-9)


def test_add_bos_scores_first_token(char_tok):
    model = tiny_gpt(char_tok.vocab_size, seq_len=16)
    res = evaluate_text(model, char_tok, [TEXT[:40]], seq_len=16, stride=8, add_bos=True)
    assert res["tokens"] == len(char_tok.encode(TEXT[:40]))
    assert res["bytes"] == len(TEXT[:40].encode())


def test_one_function_serves_training_and_the_eval_stage():
    """evaluate_lm (head only at targets, packed documents) against both former computations: training's
    summed loss per target token, and the eval stage's full-logit per-row metrics with standard errors."""
    from chatforge.train import loss_sum, val_loss

    vocab = 48
    model = tiny_gpt(vocab)
    batches = random_batches(vocab, n=3, B=4, T=16, ignore_frac=0.3, seed=7)
    for b in batches[:2]:  # SFT-like rows: targets end early, the rest is padding
        b["y"][:, 12:] = -100
    batches[2]["doc_ids"] = (torch.arange(16) >= 9).long().expand(4, 16)  # two packed documents per row
    token_bytes = np.arange(vocab) % 3 + 1
    res = evaluate_lm(model, batches, device="cpu", token_bytes=token_bytes)

    with torch.no_grad():
        model.eval()
        sums = [loss_sum(model, b) for b in batches]
        rows = []  # per row: nll sum, top-1 hits, top-5 hits, targets, bytes; from every position's logits
        for b in batches:
            logits = model(b["x"], **({"doc_ids": b["doc_ids"]} if "doc_ids" in b else {})).double()
            for lg, y in zip(logits, b["y"]):
                keep = y != -100
                lg, y = lg[keep], y[keep]
                nll = F.cross_entropy(lg, y, reduction="sum").item()
                top = lg.topk(5, -1).indices
                rows.append((nll, (top[:, 0] == y).sum().item(), (top == y[:, None]).any(-1).sum().item(),
                             len(y), token_bytes[y.numpy()].sum()))
        model.train()
    train_loss = sum(s.item() for s, _ in sums) / sum(n for _, n in sums)
    assert val_loss(model, batches, torch.device("cpu")) == pytest.approx(train_loss, rel=1e-6)
    assert res["loss"] == pytest.approx(train_loss, rel=1e-6)

    r = np.array([row for row in rows if row[3] > 0], dtype=np.float64)
    n, total = r[:, 3], r[:, 3].sum()

    def mean_se(col):
        mean = r[:, col].sum() / total
        resid = r[:, col] - mean * n
        return mean, math.sqrt(len(r) / (len(r) - 1) * (resid ** 2).sum()) / total

    for key, col in (("loss", 0), ("acc", 1), ("top5", 2)):
        mean, se = mean_se(col)
        assert res[key] == pytest.approx(mean, rel=1e-5), key
        assert res[f"{key}_se"] == pytest.approx(se, rel=1e-4), key
    assert (res["tokens"], res["sequences"], res["bytes"]) == (int(total), len(r), int(r[:, 4].sum()))
    assert res["bpb"] == pytest.approx(r[:, 0].sum() / math.log(2) / r[:, 4].sum(), rel=1e-5)
    assert set(evaluate_lm(model, batches, accuracy=False)) == {"loss", "loss_se", "ppl", "tokens", "sequences"}
