"""Scale: process pool, shard-and-merge, mixing weights, and Hugging Face save_to_disk inputs, on real files."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pytest

from chatforge.config import DataConfig
from chatforge.data.merge import merge_parts
from chatforge.data.documents import iter_documents
from chatforge.data.prepare import assign_files, plan_inputs, prepare_corpus
from chatforge.data.sources import expand_inputs, iter_records
from chatforge.errors import UserError

WORDS = "apple river stone cloud seven orange quiet lamp garden tiger music paper window silver bread".split()


def _docs(n: int, seed: int, words: int = 50) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(n)]


def _near_copy(doc: str) -> str:
    w = doc.split()
    w[len(w) // 2] = "zebra"
    return " ".join(w)


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _outputs(out: Path) -> dict[str, bytes]:
    """Every shard's bytes (the manifest is compared as a dict: it names its own folder nowhere)."""
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.jsonl.zst"))}


@pytest.fixture()
def many_files(tmp_path) -> list[str]:
    """5 files with copies and near copies across files, so cross-part dedup matters."""
    docs = _docs(300, 0, 120)
    extra = docs[:20] + [_near_copy(d) for d in docs[20:30]]  # exact and near duplicates of file 0's docs
    files = []
    for i in range(5):
        part = docs[i::5] + (extra if i == 4 else [])
        files.append(str(_write_jsonl(tmp_path / f"in{i}.jsonl", part)))
    return files


@pytest.mark.parametrize("mode", ["by_file", "by_document"])
def test_merge_of_three_parts_equals_single_run(tmp_path, many_files, mode):
    inputs = many_files if mode == "by_file" else [str(tmp_path / "all.jsonl")]
    if mode == "by_document":  # one big file: fewer files than shards -> split by record number
        _write_jsonl(tmp_path / "all.jsonl", [t for f in many_files for t, _, _ in iter_records(f)])
        with open(tmp_path / "all.jsonl", "a") as fh:
            fh.write('{"text": "broken\n')  # a read error: counted once, not once per part
    cfg = DataConfig(inputs=inputs, near_dedup=True, val_fraction=0.1)
    single = prepare_corpus(cfg, tmp_path / "single")
    parts = []
    for i in range(3):
        m = prepare_corpus(cfg, tmp_path / f"part{i}", shard_index=i, num_shards=3)
        assert m["format"] == "chatforge-corpus-part/1" and m["documents_written"] > 0
        parts.append(tmp_path / f"part{i}")
    merged = merge_parts(list(reversed(parts)), tmp_path / "merged", cfg)  # any order of part folders
    assert _outputs(tmp_path / "merged") == _outputs(tmp_path / "single")
    assert merged == single
    assert single["dropped"]["duplicate"]["documents"] == 20
    assert single["dropped"]["near_duplicate"]["documents"] == 10
    if mode == "by_document":
        assert single["read_errors"] == {"malformed_json": 1}
        assert len((tmp_path / "merged" / "rejects.jsonl").read_text().splitlines()) == 1


def test_partition_is_deterministic_and_balanced(tmp_path):
    for i, n in enumerate([5000, 100, 100, 4000, 200, 50]):
        (tmp_path / f"f{i}.txt").write_text("x" * n)
    files = plan_inputs(DataConfig(inputs=[str(tmp_path)]))
    owner = assign_files(files, 2)
    assert owner == assign_files(plan_inputs(DataConfig(inputs=[str(tmp_path)])), 2)
    load = [sum(f.size for f in files if owner[f.index] == s) for s in range(2)]
    assert sorted(load) == [4450, 5000]  # largest-first greedy
    assert assign_files(files, 10) is None  # fewer files than shards: by document


def test_parts_are_checked_before_merging(tmp_path, many_files):
    cfg = DataConfig(inputs=many_files)
    for i in range(2):
        prepare_corpus(cfg, tmp_path / f"p{i}", shard_index=i, num_shards=2)
    with pytest.raises(UserError, match=r"shard indexes \[0\]"):
        merge_parts([tmp_path / "p0"], tmp_path / "m")
    with pytest.raises(UserError, match="min_chars"):
        merge_parts([tmp_path / "p0", tmp_path / "p1"], tmp_path / "m", DataConfig(inputs=many_files, min_chars=5))
    with pytest.raises(UserError, match="sharded prepare"):
        list(iter_documents(tmp_path / "p0", "train"))
    with pytest.raises(UserError, match="num-shards"):
        prepare_corpus(cfg, tmp_path / "bad", shard_index=2, num_shards=2)
    m = merge_parts([tmp_path / "p0", tmp_path / "p1"], tmp_path / "m")  # config taken from the parts
    assert m["documents_kept"] == 310  # 20 exact copies dropped; near copies stay (near_dedup off)


def test_workers_give_byte_identical_output(tmp_path):
    docs = _docs(3000, 1, 30)
    docs += docs[:100] + [_near_copy(d) for d in docs[100:150]]
    path = _write_jsonl(tmp_path / "d.jsonl", docs)
    base = dict(inputs=[str(path)], near_dedup=True, quality_filters=True, min_words=10, mask_pii=True)
    m1 = prepare_corpus(DataConfig(**base, workers=1), tmp_path / "w1")
    m2 = prepare_corpus(DataConfig(**base, workers=2), tmp_path / "w2")
    assert _outputs(tmp_path / "w1") == _outputs(tmp_path / "w2")
    m1["config"].pop("workers"), m2["config"].pop("workers")
    assert m1 == m2 and m1["dropped"]["duplicate"]["documents"] == 100
    m3 = prepare_corpus(DataConfig(**base, workers=2, max_docs=500), tmp_path / "w3")  # stops the pool early
    assert m3["documents_kept"] == 500 and m3["stopped_by"] == "max_docs"


def test_mixing_weights_upsample_and_downsample(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", _docs(200, 2))
    b = _write_jsonl(tmp_path / "b.jsonl", _docs(400, 3))
    m = prepare_corpus(DataConfig(inputs=[str(a), str(b)], weights=[2.0, 0.5], val_fraction=0.1), tmp_path / "o")
    mix = {Path(x["input"]).name: x for x in m["mix"]}
    assert mix["a.jsonl"]["weight"] == 2.0
    a_train = mix["a.jsonl"]["documents_kept"] - mix["a.jsonl"]["val_documents"]
    assert mix["a.jsonl"]["train_documents"] == 2 * a_train
    b_train = mix["b.jsonl"]["documents_kept"] - mix["b.jsonl"]["val_documents"]
    kept_b = mix["b.jsonl"]["train_documents"]
    assert 0.4 * b_train < kept_b < 0.6 * b_train and kept_b + mix["b.jsonl"]["train_downsampled"] == b_train
    assert m["dropped"]["downsampled"]["documents"] == b_train - kept_b
    train = list(iter_documents(tmp_path / "o", "train"))
    assert len(train) == m["splits"]["train"]["documents"] == 2 * a_train + kept_b
    # Copies are a pass apart, not adjacent; val is never weighted.
    assert train[0] != train[1] and train.count(train[0]) == 2
    assert not set(iter_documents(tmp_path / "o", "val")) & set(train)
    # Deterministic: the same half of b is kept on every run.
    prepare_corpus(DataConfig(inputs=[str(a), str(b)], weights=[2.0, 0.5], val_fraction=0.1), tmp_path / "o2")
    assert _outputs(tmp_path / "o") == _outputs(tmp_path / "o2")
    with pytest.raises(UserError, match="one weight per input"):
        prepare_corpus(DataConfig(inputs=[str(a), str(b)], weights=[1.0]), tmp_path / "o3")


def _save_to_disk(folder: Path, texts: list, stream: bool = True) -> None:
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow stream file(s), state.json, dataset_info.json."""
    folder.mkdir(parents=True)
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, table.schema) as w:
            for batch in table.to_batches(max_chunksize=7):
                w.write_batch(batch)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                   "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))


def test_hf_save_to_disk_folders_are_read_without_datasets(tmp_path):
    docs = _docs(40, 4)
    _save_to_disk(tmp_path / "ds", docs[:30] + [None])
    texts = [t for t, _, _ in iter_records(tmp_path / "ds")]
    assert texts == docs[:30]
    with pytest.raises(UserError, match=r"no field 'body'.*id, text"):
        list(iter_records(tmp_path / "ds", text_field="body"))
    # A DatasetDict: one folder per split, all read, in dataset_dict.json order.
    dd = tmp_path / "dd"
    _save_to_disk(dd / "train", docs[:25])
    _save_to_disk(dd / "test", docs[25:], stream=False)
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert expand_inputs([str(dd)]) == [dd / "train", dd / "test"]
    m = prepare_corpus(DataConfig(inputs=[str(dd)]), tmp_path / "o")
    assert m["documents_kept"] == 40 and [s["documents_read"] for s in m["sources"]] == [25, 15]


def test_hub_names_need_datasets(tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="needs the `datasets` package"):
            prepare_corpus(DataConfig(inputs=["hf:roneneldan/TinyStories"]), tmp_path / "o")
    else:
        pytest.skip("`datasets` is installed; the Hub needs a network, which tests do not use")
