"""Loaders: windows, determinism, rank split, exact resume, document masks, SFT masking/packing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.config import ModelConfig
from chatforge.data.loader import (IGNORE, SFTLoader, TokenLoader, iter_eval_batches, iter_sft_eval_batches,
                                   n_eval_batches)
from chatforge.model import GPT


def corpus(n=5000, seed=0):
    return np.random.default_rng(seed).integers(1, 500, size=n).astype(np.uint16)


def test_windows_are_contiguous_and_shifted():
    a = np.arange(3000, dtype=np.uint32)  # token value == position: windows are easy to check
    b = TokenLoader([a], 4, 32, seed=3).next_batch()
    assert b["x"].shape == (4, 32) and b["x"].dtype == torch.long
    assert torch.equal(b["y"], b["x"] + 1)
    assert torch.equal(b["x"][:, 1:], b["x"][:, :-1] + 1)


def test_epoch_covers_every_window_once_then_reshuffles():
    a = np.arange(32 * 20 + 1, dtype=np.uint32)
    L = TokenLoader([a], 4, 32, seed=1)
    starts = [int(s) for _ in range(5) for s in L.next_batch()["x"][:, 0]]
    assert sorted(starts) == list(range(0, 32 * 20, 32))
    assert L.state_dict()["epoch"] == 1
    nxt = [int(s) for _ in range(5) for s in L.next_batch()["x"][:, 0]]
    assert nxt != starts  # a new permutation (and a shifted grid)


def test_seeded_determinism_and_exact_resume():
    arrays = [corpus(4000, 0), corpus(2500, 1)]
    a, b = TokenLoader(arrays, 3, 16, seed=7), TokenLoader(arrays, 3, 16, seed=7)
    for _ in range(50):  # crosses epochs
        assert torch.equal(a.next_batch()["x"], b.next_batch()["x"])
    assert not torch.equal(TokenLoader(arrays, 3, 16, seed=8).next_batch()["x"],
                           TokenLoader(arrays, 3, 16, seed=7).next_batch()["x"])
    state = a.state_dict()
    expected = [a.next_batch()["x"] for _ in range(30)]
    c = TokenLoader(arrays, 3, 16, seed=7)
    c.load_state_dict(state)
    assert all(torch.equal(e, c.next_batch()["x"]) for e in expected)


def test_ranks_are_disjoint_and_union_is_the_global_batch():
    arrays = [corpus(6000)]
    single = TokenLoader(arrays, 8, 16, seed=2)
    ranks = [TokenLoader(arrays, 4, 16, seed=2, rank=r, world=2) for r in range(2)]
    for _ in range(20):
        g = single.next_batch()["x"]
        parts = [r.next_batch()["x"] for r in ranks]
        assert torch.equal(torch.cat(parts), g)


def test_memmap_input(tmp_path):
    path = tmp_path / "tok.bin"
    mm = np.memmap(path, dtype=np.uint16, mode="w+", shape=(200_000,))
    mm[:] = np.arange(200_000) % 60000
    mm.flush()
    ro = np.memmap(path, dtype=np.uint16, mode="r")
    L = TokenLoader([ro], 2, 128, seed=0)
    assert L.arrays[0] is ro  # never copied into memory
    x = L.next_batch()["x"]
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(2, 127, dtype=torch.long))


def test_doc_mask_resets_positions_at_bos():
    a = np.array(([0] + [5] * 6) * 30, dtype=np.uint16)  # documents of 7 tokens starting with <|bos|>=0
    b = TokenLoader([a], 2, 20, seed=0, doc_mask=True).next_batch()
    x, pos, doc = b["x"], b["position_ids"], b["doc_ids"]
    for r in range(2):
        for t in range(20):
            if x[r, t] == 0:
                assert pos[r, t] == 0
            if t > 0 and x[r, t] != 0:
                assert pos[r, t] == pos[r, t - 1] + 1 and doc[r, t] == doc[r, t - 1]


def test_from_dir_memory_maps_shards(tmp_path):
    shards = pytest.importorskip("chatforge.data.shards", reason="data/shards.py not available")
    docs = [np.arange(1, 200) % 90 + 1 for _ in range(20)]
    tokens = np.concatenate([np.concatenate([[0], d]) for d in docs]).astype(np.uint16)  # <|bos|>=0 per doc
    starts = np.cumsum([0] + [len(d) + 1 for d in docs[:-1]]).astype(np.int64)
    for i in range(2):  # two shards, written in the shard module's own format
        (tmp_path / f"shard_{i:05d}.bin").write_bytes(
            shards.pack_header(100, "0123456789abcdef", len(tokens), len(docs)) + tokens.tobytes())
        np.save(tmp_path / f"shard_{i:05d}.idx.npy", starts)
    L = TokenLoader.from_dir(tmp_path, 2, 16, tok_hash="0123456789abcdef", vocab_size=100, doc_mask=True)
    assert len(L.arrays) == 2 and all(isinstance(a, np.memmap) for a in L.arrays)
    b = L.next_batch()
    assert b["x"].shape == (2, 16) and int(b["x"].max()) < 100
    assert torch.equal(b["position_ids"][b["x"] == 0], torch.zeros(int((b["x"] == 0).sum()), dtype=torch.long))


EXAMPLES = [([0, 11, 12, 13, 14], [0, 0, 1, 1, 1]), ([0, 21, 22], [0, 1, 1]),
            ([0, 31, 32, 33, 34, 35, 36], [0, 0, 0, 1, 1, 1, 1]), ([0, 41, 42, 43], [0, 1, 0, 1])]


@pytest.mark.parametrize("lens,bs,cap", [([100], 4, 0), ([100, 33, 8, 65], 3, 0), ([100, 33, 65], 2, 3), ([5], 2, 0)])
def test_eval_batch_count_is_what_the_iterator_yields(lens, bs, cap):
    arrays = [np.arange(n) for n in lens]
    assert n_eval_batches(arrays, bs, 16, cap) == len(list(iter_eval_batches(arrays, bs, 16, max_batches=cap)))


def test_sft_targets_are_masked_next_tokens():
    b = next(iter_sft_eval_batches(EXAMPLES, 4, 8, pad_id=99))
    assert b["x"].shape == (4, 6)  # padded to the batch's longest row (7 tokens -> 6 inputs), not to seq_len 8
    assert b["x"][0].tolist() == [0, 11, 12, 13, 99, 99]
    assert b["y"][0].tolist() == [IGNORE, 12, 13, 14] + [IGNORE] * 2
    assert b["y"][3].tolist()[:3] == [41, IGNORE, 43]


def test_sft_eval_padding_to_the_longest_row_scores_the_same():
    """Right padding after causal attention changes no score: padded to seq_len or to the batch's longest,
    the loss and accuracy are the same."""
    from chatforge.config import ModelConfig
    from chatforge.data.loader import collate_rows, _sft_pair
    from chatforge.evaluate import evaluate_lm
    from chatforge.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_kv_head=2, n_embd=32, seq_len=64, vocab_size=100)).eval()
    short = evaluate_lm(model, iter_sft_eval_batches(EXAMPLES, 2, 64, pad_id=99))
    pairs = [_sft_pair(ids, m, 64) for ids, m in EXAMPLES]
    full = evaluate_lm(model, [collate_rows([[p] for p in pairs[i:i + 2]], 64, 99, with_docs=False)
                               for i in range(0, len(pairs), 2)])
    assert short["tokens"] == full["tokens"] == sum(sum(m[1:]) for _, m in EXAMPLES)
    assert short["loss"] == pytest.approx(full["loss"], abs=1e-5) and (short["acc"], short["top5"]) == (full["acc"], full["top5"])


def test_sft_eval_batches_limited_are_spread_over_the_file():
    # A prepared val file lists its sources one after another: a limited evaluation must not see only the first.
    examples = [([0, 1, 2], [0, 1, 1])] * 30 + [([0, 7, 8], [0, 1, 1])] * 30
    firsts = [int(x) for b in iter_sft_eval_batches(examples, 4, 8, pad_id=99, max_batches=2) for x in b["x"][:, 1]]
    assert len(firsts) == 8 and firsts.count(1) == 4 and firsts.count(7) == 4


def test_sft_packing_rows_and_doc_ids():
    L = SFTLoader(EXAMPLES, 2, 12, pad_id=99, seed=0, pack=True)
    b = L.next_batch()
    # all 4 examples (4+2+6+3 = 15 inputs) fit in 2 rows of 12
    real = (b["x"] != 99).sum().item()
    assert real == 15
    for r in range(2):
        pos, doc = b["position_ids"][r], b["doc_ids"][r]
        for t in range(1, 12):
            assert (doc[t] == doc[t - 1] and pos[t] == pos[t - 1] + 1) or (doc[t] == doc[t - 1] + 1 and pos[t] == 0)
    # unpacked: one example per row
    u = SFTLoader(EXAMPLES, 4, 12, pad_id=99, seed=0, pack=False).next_batch()
    assert "doc_ids" not in u and sorted((u["x"] != 99).sum(1).tolist()) == [2, 3, 4, 6]


def test_sft_resume_and_ranks():
    ex = [([0] + list(range(1, n)), [0] + [1] * (n - 1)) for n in range(3, 30)]
    a = SFTLoader(ex, 2, 32, pad_id=0, seed=4)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    exp = [a.next_batch()["x"] for _ in range(10)]
    b = SFTLoader(ex, 2, 32, pad_id=0, seed=4)
    b.load_state_dict(state)
    assert all(torch.equal(e, b.next_batch()["x"]) for e in exp)
    single = SFTLoader(ex, 4, 32, pad_id=0, seed=4)
    ranks = [SFTLoader(ex, 2, 32, pad_id=0, seed=4, rank=r, world=2) for r in range(2)]
    for _ in range(5):
        assert torch.equal(torch.cat([r.next_batch()["x"] for r in ranks]), single.next_batch()["x"])


def test_packed_logits_match_unpacked():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, seq_len=16, vocab_size=50)).eval()
    ex = [([0, 5, 6, 7, 8], [1] * 5), ([0, 9, 10, 11], [1] * 4)]
    packed = SFTLoader(ex, 1, 16, pad_id=1, seed=0, pack=True).next_batch()
    assert packed["doc_ids"][0, :7].tolist() in ([0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1])
    with torch.no_grad():
        lp = model(packed["x"], doc_ids=packed["doc_ids"], position_ids=packed["position_ids"])
        first = 4 if packed["doc_ids"][0, 3] == 0 else 3  # where the second example starts
        second_ids = packed["x"][0, first:first + (7 - first)]
        alone = model(second_ids.unsqueeze(0))
    torch.testing.assert_close(lp[0, first:7], alone[0], atol=1e-5, rtol=1e-5)
    # and without doc_ids the second example would see the first (the test can fail)
    with torch.no_grad():
        leaky = model(packed["x"])
    assert not torch.allclose(leaky[0, first:7], alone[0], atol=1e-3)


def test_eval_batches_cover_split_in_order():
    a = np.arange(1000, dtype=np.uint32)
    batches = list(iter_eval_batches([a], 4, 10))
    starts = [int(s) for b in batches for s in b["x"][:, 0]]
    assert starts == list(range(0, 990, 10))
    assert len(list(iter_eval_batches([a], 4, 10, max_batches=3))) == 3


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_memmapped_shards_are_read_without_growing_resident_memory(tmp_path):
    """Random windows over a 64 MB memmap: the batches equal plain slicing, and resident memory stays flat
    (reading through the mapping would leave most of the file resident: the kernel maps read-ahead chunks)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    path = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 4096, 32 << 20, dtype=np.uint16).tofile(path)
    a = np.memmap(path, dtype=np.uint16, mode="r")
    fast, plain = TokenLoader([a], 8, 64, seed=1), TokenLoader([a], 8, 64, seed=1)
    plain._files = [None]  # force reads through the mapping
    for _ in range(3):
        assert torch.equal(fast.next_batch()["x"], plain.next_batch()["x"])
    before = _rss_file_kb()
    for _ in range(400):
        fast.next_batch()
    assert _rss_file_kb() - before < 8 << 10, (before, _rss_file_kb())  # < 8 MB for a 64 MB file
