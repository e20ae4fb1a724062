"""data.executor=ray: prepare and encode on a real (loopback, 2-CPU) Ray cluster give the local executor's bytes,
also when a worker process dies mid-job; without Ray the choice is a one-line UserError."""
from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest

from chatforge.config import DataConfig, TokenizerConfig
from chatforge.data import executors, prepare, shards
from chatforge.data.prepare import prepare_corpus
from chatforge.data.shards import encode_documents
from chatforge.errors import UserError

WORDS = "apple river stone cloud seven orange quiet lamp garden tiger music paper window silver bread".split()


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """3 files with exact and near copies across files, addresses to mask, a broken record."""
    d = tmp_path_factory.mktemp("in")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + "." for _ in range(900)]
    docs[5] += " mail bob@example.com from 10.0.0.1"
    near = [" ".join(w if i != 7 else "zebra" for i, w in enumerate(t.split())) for t in docs[:40]]
    files = []
    for i in range(3):
        part = docs[i::3] + (docs[:30] + near if i == 2 else []) + ["short"]
        p = d / f"in{i}.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in part) + ('{"text": "broken\n' if i == 1 else ""))
        files.append(str(p))
    return files


def _digest(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def _manifest(folder: Path) -> dict:
    m = json.loads((folder / "manifest.json").read_text())
    for k in ("executor", "ray_address"):
        m["config"].pop(k)
    return m


def _cfg(inputs, **kw) -> DataConfig:
    return DataConfig(**{"inputs": inputs, "near_dedup": True, "mask_pii": True, "val_fraction": 0.1,
                         "weights": [1.0, 2.0, 0.5], "min_chars": 20, **kw})


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    """Many small batches, so task order and in-flight limits are exercised on a small corpus."""
    monkeypatch.setattr(prepare, "_BATCH_DOCS", 64)
    monkeypatch.setattr(shards, "BATCH_BYTES", 40_000)
    monkeypatch.setattr(executors.RayEncoder, "RUN_CHARS", 8_000)


@pytest.fixture(scope="module")
def local_out(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local")
    mp = pytest.MonkeyPatch()
    mp.setattr(prepare, "_BATCH_DOCS", 64)
    try:
        prepare_corpus(_cfg(inputs), out)
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("crash", [False, True], ids=["clean", "worker_killed"])
def test_prepare_ray_matches_local(ray_cluster, inputs, local_out, tmp_path, monkeypatch, crash):
    marker = tmp_path / "crashed"
    if crash:  # the first task to run kills its worker process (os._exit); Ray re-runs it (max_retries)
        monkeypatch.setenv(executors._CRASH_ENV, str(marker))
    out = tmp_path / "ray"
    m = prepare_corpus(_cfg(inputs, executor="ray"), out)
    assert marker.exists() == crash
    assert m["documents_read"] > 900 and m["dropped"]["duplicate"]["documents"] >= 30
    assert m["dropped"]["near_duplicate"]["documents"] > 0 and m["masked"]["emails"] >= 1
    assert _digest(out, skip=("manifest.json",)) == _digest(local_out, skip=("manifest.json",))
    assert _manifest(out) == _manifest(local_out)
    assert m["config"]["executor"] == "ray"


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory) -> list[str]:
    """3 files: exact copies within and across files, near copies (a few words edited in long documents),
    broken JSON lines and a record without the text field in the middle of files 0 and 1."""
    d = tmp_path_factory.mktemp("mixed")
    rng = random.Random(1)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200))) + "." for _ in range(600)]
    long_docs = [t for t in docs if len(t.split()) > 120][:30]
    near = [" ".join("zebra" if i in (3, 50) else w for i, w in enumerate(t.split())) for t in long_docs]
    lines = [[json.dumps({"text": t}) for t in part] for part in (docs[:200], docs[200:400], docs[400:])]
    lines[0][10:10] = [json.dumps({"text": docs[3]}), json.dumps({"text": docs[3]})]  # copies in one file
    lines[0][120:120] = ['{"text": "broken', json.dumps({"body": "no text field"})]
    lines[1][100:100] = ['{"text": oops}']
    lines[2] += [json.dumps({"text": t}) for t in docs[150:180] + near] + ['{"text": "cut']
    files = []
    for i, part in enumerate(lines):
        p = d / f"m{i}.jsonl"
        p.write_text("\n".join(part) + "\n")
        files.append(str(p))
    return files


@pytest.mark.parametrize("near,max_docs", [(True, 0), (False, 0), (True, 100), (True, 330)],
                         ids=["near", "exact_only", "near_stop_in_file0", "near_stop_in_file1"])
def test_prepare_ray_dedup_matches_local(ray_cluster, mixed_inputs, tmp_path, near, max_docs):
    """The distributed group-bys give the sequential verdicts: same bytes (shards, rejects.jsonl) and counts,
    also when max_docs stops the run mid-input (read problems after the stop are not counted by either)."""
    cfg = {"near_dedup": near, "max_docs": max_docs}
    prepare_corpus(_cfg(mixed_inputs, **cfg), tmp_path / "local")
    b = prepare_corpus(_cfg(mixed_inputs, executor="ray", **cfg), tmp_path / "ray")
    assert _digest(tmp_path / "ray", skip=("manifest.json",)) == _digest(tmp_path / "local", skip=("manifest.json",))
    assert _manifest(tmp_path / "ray") == _manifest(tmp_path / "local")
    assert b["stopped_by"] == ("max_docs" if max_docs else None)
    assert b["dropped"]["duplicate"]["documents"] >= (2 if max_docs else 30)
    if near and not max_docs:
        assert b["dropped"]["near_duplicate"]["documents"] >= 20
    # the stop lands between read problems, so their counts depend on where it is
    assert sum(b["read_errors"].values()) == {0: 4, 100: 0, 330: 3}[max_docs]
    if not max_docs:
        assert b["mix"][1]["train_documents"] > b["mix"][1]["documents_kept"]  # upsampled (weight 2)


def test_resolve_near_equals_minhash_lsh():
    """Step 3's bucket grouping + greedy resolution == datasketch's sequential query-then-insert, on signatures
    built so that band keys collide often (chains: A ~ B ~ C where B is dropped, C kept, ...). No Ray."""
    import numpy as np

    from chatforge.data.dedup import NearDedup
    from chatforge.data.ray_prepare import lsh_shape, near_buckets, resolve_near

    b, r = lsh_shape(0.8, 32)
    assert b * r <= 32 and b >= 2
    for seed in range(20):
        rng = np.random.default_rng(seed)
        n = 60
        pool = rng.integers(0, 2**32, size=(b, 4, r), dtype=np.uint64)  # 4 possible keys per band
        sigs = rng.integers(0, 2**32, size=(n, 32), dtype=np.uint64)
        for j in range(n):
            for i in range(b):
                if rng.random() < 0.3:  # this band's key comes from a small pool: collisions
                    sigs[j, i * r:(i + 1) * r] = pool[i, rng.integers(4)]
        nd = NearDedup(0.8, 32)
        expected = [j for j in range(n) if nd.is_duplicate_signature(sigs[j])]
        orders = [(j // 25) << 40 | (j % 25) for j in range(n)]  # order keys across "files"
        got = resolve_near(near_buckets(orders, sigs, b, r)).tolist()
        assert got == [orders[j] for j in expected]
        assert 0 < len(expected) < n


def test_prepare_part_ray_matches_local(ray_cluster, inputs, tmp_path):
    """--shard/--num-shards parts (for `merge`) also come out the same from Ray."""
    a, b = tmp_path / "local", tmp_path / "ray"
    prepare_corpus(_cfg(inputs), a, shard_index=1, num_shards=2)
    prepare_corpus(_cfg(inputs, executor="ray"), b, shard_index=1, num_shards=2)
    assert _digest(a, skip=("manifest.json",)) == _digest(b, skip=("manifest.json",))
    assert _manifest(a) == _manifest(b)


@pytest.fixture(scope="module")
def tok():
    from chatforge.data.stdlib_corpus import stdlib_texts
    from chatforge.tokenizer import Tokenizer
    return Tokenizer.train(stdlib_texts(100_000), TokenizerConfig(vocab_size=400))


@pytest.mark.parametrize("crash", [False, True], ids=["clean", "worker_killed"])
def test_encode_ray_matches_local(ray_cluster, local_out, tok, tmp_path, monkeypatch, crash):
    a, b = tmp_path / "local", tmp_path / "ray"
    sa = encode_documents(tok, local_out, a, workers=2)
    marker = tmp_path / "crashed"
    if crash:
        monkeypatch.setenv(executors._CRASH_ENV, str(marker))
    sb = encode_documents(tok, local_out, b, workers=2, executor="ray")
    assert marker.exists() == crash
    assert _digest(a, skip=("stats.json",)) == _digest(b, skip=("stats.json",))
    assert len(_digest(a)) >= 5  # both splits, several shards' worth of batches
    for split in sa:
        for k in ("tokens", "docs", "shards", "bytes_in"):
            assert sa[split][k] == sb[split][k]


def test_write_shards_ray_small_shards(ray_cluster, local_out, tok, tmp_path):
    """Shard boundaries (shard_tokens) fall in the same places when runs come from Ray tasks."""
    from chatforge.data.documents import iter_documents
    a = shards.write_shards(tok, iter_documents(local_out, "train"), tmp_path / "a", shard_tokens=3000, workers=1)
    b = shards.write_shards(tok, iter_documents(local_out, "train"), tmp_path / "b", shard_tokens=3000,
                            executor="ray")
    assert a["shards"] > 3 and a["shards"] == b["shards"]
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_missing_ray_is_one_line_user_error(monkeypatch, inputs, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'chatforge\[ray\]'"):
        prepare_corpus(_cfg(inputs, executor="ray"), tmp_path / "out")
    with pytest.raises(UserError, match="chatforge\\[ray\\]"):
        shards.write_shards(None, ["x"], tmp_path / "tok", executor="ray")


def test_unknown_executor(inputs, tmp_path):
    with pytest.raises(UserError, match="data.executor='spark'"):
        prepare_corpus(_cfg(inputs, executor="spark"), tmp_path / "out")


def test_cli_flags_set_config(tmp_path):
    from chatforge.cli import build_parser, resolve
    for stage in ("prepare", "encode"):
        args = build_parser().subcommands[stage].parse_intermixed_args(
            [str(tmp_path / "run"), "--executor", "ray", "--address", "ray://head:10001"])
        args.command = stage
        cfg, _, _ = resolve(args)
        assert (cfg.data.executor, cfg.data.ray_address) == ("ray", "ray://head:10001")


def test_prepare_on_two_node_cluster_by_address(inputs, local_out, tmp_path):
    """--address: join an existing cluster (a head and a worker node on loopback, as `ray start` makes)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "ray"
        prepare_corpus(_cfg(list(inputs), executor="ray", ray_address=cluster.address), out)
        assert not ray.is_initialized()  # the session it opened is closed again
        assert _digest(out, skip=("manifest.json",)) == _digest(local_out, skip=("manifest.json",))
        assert _manifest(out) == _manifest(local_out)
    finally:
        cluster.shutdown()
