"""Every task format in ../shared/data loads; bad input fails with the file and row named."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from iss.config.io import load_config
from iss.config.schema import (
    Budget,
    CorpusConfig,
    CorpusMixture,
    IssConfig,
    RetrievalConfig,
    TaskConfig,
    fingerprint_dump,
)
from iss.data.corpus import corpus_shards, iter_corpus, read_shard
from iss.data.task import load_task
from iss.errors import ConfigError, DataError
from iss.modeling.family import PACKAGE_PREFIX, Checkpoint
from iss.pipeline.run import Pipeline
from iss.retrieval.bm25 import BM25Index

from .conftest import CORPUS, REPO, SHARED, require_shared, require_shared_path

TASKS = {
    "chemprot": ({}, (4169, 2427, 3469), 13),
    "acl_arc": ({}, (1688, 114, 139), 6),
    "scierc": ({}, (3219, 455, 974), 7),
    "sst2": ({"text_column": "sentence"}, (6920, 872, 1821), 2),
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shared_tasks_load_with_the_documented_counts(name):
    require_shared()
    options, counts, n_labels = TASKS[name]
    task = load_task(TaskConfig(name=name, path=str(SHARED / "tasks" / name), **options))
    assert tuple(task.splits[s].num_rows for s in ("train", "dev", "test")) == counts
    assert len(task.labels) == n_labels
    for split in task.splits.values():
        ids = split.column("label_id").to_numpy()
        assert [task.labels[i] for i in ids] == split.column("label").to_pylist()


def test_agnews_single_headerless_csv_is_split_by_seed():
    require_shared()
    config = TaskConfig(name="agnews", path=str(SHARED / "tasks" / "agnews"), text_column=["title", "description"])
    first, again, other = load_task(config, seed=0), load_task(config, seed=0), load_task(config, seed=1)
    with (SHARED / "tasks" / "agnews" / "all.csv").open(newline="", encoding="utf-8") as handle:
        records = sum(1 for _ in csv.reader(handle))
    assert sum(t.num_rows for t in first.splits.values()) == records  # the first row is data, not a header
    assert first.labels == ["1", "2", "3", "4"]
    assert first.texts("dev") == again.texts("dev") and first.texts("dev") != other.texts("dev")
    train_ids = set(first.splits["train"].column("id").to_pylist())
    assert not train_ids & set(first.splits["test"].column("id").to_pylist())
    assert first.texts("train")[0].startswith("Fears for T N pension after talks Unions representing")


def test_parquet_task_and_subsampling(tmp_path):
    for split, labels in (("train", ["a", "b", "a", "b"]), ("dev", ["a", "b"]), ("test", ["b"])):
        pq.write_table(
            pa.table({"text": [f"t{i}" for i in range(len(labels))], "y": labels}), tmp_path / f"{split}.parquet"
        )
    task = load_task(TaskConfig(path=str(tmp_path), label_column="y", max_train=3), seed=0)
    assert task.splits["train"].num_rows == 3 and task.labels == ["a", "b"]


def _write_split_folder(folder, train, dev, test):
    folder.mkdir()
    for name, rows in (("train", train), ("dev", dev), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_bad_task_inputs_name_file_and_row(tmp_path):
    good = [{"text": "x", "label": "A"}, {"text": "y", "label": "B"}]
    _write_split_folder(tmp_path / "unseen", good, [{"text": "z", "label": "C"}], good)
    with pytest.raises(DataError, match=r"dev\.jsonl: row 1: label 'C' does not occur in the train split"):
        load_task(TaskConfig(path=str(tmp_path / "unseen")))

    _write_split_folder(tmp_path / "empty_text", [*good, {"text": "  ", "label": "A"}], good, good)
    with pytest.raises(DataError, match=r"train\.jsonl: row 3: empty text"):
        load_task(TaskConfig(path=str(tmp_path / "empty_text")))

    _write_split_folder(tmp_path / "columns", [{"sentence": "x", "label": "A"}], good, good)
    with pytest.raises(DataError, match=r"train\.jsonl: missing column\(s\) \['text'\]"):
        load_task(TaskConfig(path=str(tmp_path / "columns")))

    (tmp_path / "empty_file").mkdir()
    for name in ("train", "dev", "test"):
        (tmp_path / "empty_file" / f"{name}.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="file is empty"):
        load_task(TaskConfig(path=str(tmp_path / "empty_file")))

    with pytest.raises(DataError, match="task path not found"):
        load_task(TaskConfig(path=str(tmp_path / "missing.jsonl")))

    _write_split_folder(tmp_path / "labels", [{"text": "x", "sentence": "A"}], good, good)
    with pytest.raises(DataError, match=r"train\.jsonl: missing label column 'label'"):
        load_task(TaskConfig(path=str(tmp_path / "labels")))

    _write_split_folder(tmp_path / "unseen_test", good, good, [*good, {"text": "z", "label": "D"}])
    with pytest.raises(DataError, match=r"test\.jsonl: row 3: label 'D' does not occur in the train split"):
        load_task(TaskConfig(path=str(tmp_path / "unseen_test")))


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "tsv"])
def test_non_utf8_task_file_names_the_line(tmp_path, suffix):
    rows = {
        "jsonl": [b'{"text": "fine", "label": "A"}', b'{"text": "caf\xe9", "label": "B"}'],
        "csv": [b"text,label", b"fine,A", b"caf\xe9,B"],
        "tsv": [b"text\tlabel", b"fine\tA", b"caf\xe9\tB"],
    }[suffix]
    path = tmp_path / f"task.{suffix}"
    path.write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(DataError, match=rf"task\.{suffix}: line {len(rows)}: not valid UTF-8"):
        load_task(TaskConfig(path=str(path)))


def test_corpus_streams_in_shards_with_global_ids():
    require_shared()
    config = CorpusConfig(paths=[str(CORPUS)], shard_size=10_000)
    sizes, last_id, sources = [], -1, set()
    for batch in iter_corpus(config):
        assert batch.ids[0] > last_id
        sizes.append(len(batch.ids))
        last_id = int(batch.ids[-1])
        sources.update(batch.sources)
    assert sum(sizes) == 74_548 and max(sizes) == 10_000
    assert {"cs_mag", "wiki_wikitext103"} <= sources


def test_corpus_folder_of_shards_txt_and_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n", encoding="utf-8")
    pq.write_table(pa.table({"text": ["third doc"], "source": ["p"]}), tmp_path / "b.parquet")
    batches = list(iter_corpus(CorpusConfig(paths=[str(tmp_path)], shard_size=2)))
    assert [t for b in batches for t in b.texts] == ["first doc", "second doc", "third doc"]
    assert [int(i) for b in batches for i in b.ids] == [0, 2, 3]  # the blank line keeps its row id


def _mixture_corpus(tmp_path: Path) -> Path:
    rows = [{"text": f"document {i}", "source": ("arxiv_cs", "bio_ohsumed", "wiki_en")[i % 3]} for i in range(3000)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:1500]), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1500:]), encoding="utf-8")
    return tmp_path


def test_a_mixture_keeps_included_sources_and_a_seeded_share_of_weighted_ones(tmp_path):
    """include/exclude by glob, weights as the share kept (drawn per document id: the same documents in every
    reader, batch size and shard), ids unchanged; by file name too."""
    corpus = _mixture_corpus(tmp_path)
    mixture = {"exclude": ["bio_*"], "weights": {"arxiv_*": 0.2}}
    config = CorpusConfig(paths=[str(corpus)], shard_size=500, mixture=mixture)
    docs = [(int(i), s) for b in iter_corpus(config) for i, s in zip(b.ids, b.sources, strict=True)]
    counts = Counter(source for _, source in docs)
    assert counts["wiki_en"] == 1000 and "bio_ohsumed" not in counts
    assert 150 < counts["arxiv_cs"] < 250  # 20 % of 1,000
    assert all(("arxiv_cs", "bio_ohsumed", "wiki_en")[i % 3] == s for i, s in docs)  # global ids kept
    small_batches = [int(i) for b in iter_corpus(config.model_copy(update={"shard_size": 7})) for i in b.ids]
    assert small_batches == [i for i, _ in docs]
    shards = [int(i) for shard in corpus_shards(config, 400) for i in read_shard(shard, config).ids]
    assert shards == [i for i, _ in docs]
    reseeded = config.model_copy(update={"mixture": CorpusMixture(**mixture, seed=1)})
    assert [int(i) for b in iter_corpus(reseeded) for i in b.ids] != small_batches
    by_file = CorpusConfig(paths=[str(corpus)], mixture={"by": "file", "include": ["b.*"]})
    assert [int(i) for b in iter_corpus(by_file) for i in b.ids] == list(range(1500, 3000))


@pytest.mark.parametrize("text", ["12.5%", "0.5%", "20%", "4000 docs", "2.5e5 tokens", 0.125])
def test_a_budget_reads_back_from_its_own_text_and_reaches_a_sweeps_variant_unchanged(text, tmp_path):
    """12.5 % must not become 12 %, nor 0.5 % fail, in a budget sweep's variants or their stage names."""
    budget = Budget.parse(text)
    assert Budget.parse(str(budget)) == budget
    variant = Pipeline(IssConfig(run_dir=str(tmp_path)), show_progress=False).method_variant("tlm", budget, budget.tag)
    assert variant.config.selection.budget == budget
    assert variant.tag == {"12.5%": "@12.5pct", "0.5%": "@0.5pct", 0.125: "@12.5pct"}.get(text, variant.tag)


def test_a_mixture_changes_the_corpus_fingerprint_and_rejects_shares_outside_0_1():
    plain = CorpusConfig(paths=["x"])
    assert "mixture" not in fingerprint_dump(plain)  # runs made before mixtures keep their fingerprints
    mixed = CorpusConfig(paths=["x"], mixture={"weights": {"arxiv_*": 0.05}})
    assert fingerprint_dump(mixed)["mixture"]["weights"] == {"arxiv_*": 0.05}
    with pytest.raises(ValidationError, match="share of a source"):
        CorpusConfig(paths=["x"], mixture={"weights": {"arxiv_*": 1.5}})


def test_bad_corpus_lines_name_file_and_line(tmp_path):
    bad_bytes = tmp_path / "bytes.jsonl"
    bad_bytes.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bytes\.jsonl: line 2: not valid UTF-8"):
        list(iter_corpus(CorpusConfig(paths=[str(bad_bytes)])))
    bad_json = tmp_path / "json.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"json\.jsonl: line 2: invalid JSON"):
        list(iter_corpus(CorpusConfig(paths=[str(bad_json)])))
    no_text = tmp_path / "field.jsonl"
    no_text.write_text('{"body": "ok"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"field\.jsonl: line 1: no 'text' field"):
        list(iter_corpus(CorpusConfig(paths=[str(no_text)])))


def test_ten_megabyte_document_is_refused_with_its_line(tmp_path):
    big = tmp_path / "big.jsonl"
    with big.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "a normal document"}) + "\n")
        handle.write(json.dumps({"text": "word " * (2 * 1024 * 1024)}) + "\n")  # 10 MiB
    with pytest.raises(DataError, match=r"big\.jsonl: line 2: document of 10,485,760 characters.*max_doc_chars"):
        list(iter_corpus(CorpusConfig(paths=[str(big)])))
    allowed = CorpusConfig(paths=[str(big)], max_doc_chars=20_000_000)
    assert [len(t) for b in iter_corpus(allowed) for t in b.texts] == [17, 10 * 1024 * 1024]


def test_empty_corpus_files_and_texts(tmp_path, caplog):
    (tmp_path / "a.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["kept", "", "   ", "also kept"]), encoding="utf-8"
    )
    batches = list(iter_corpus(CorpusConfig(paths=[str(tmp_path)])))
    assert [(int(i), t) for b in batches for i, t in zip(b.ids, b.texts, strict=True)] == [
        (0, "kept"),
        (3, "also kept"),
    ]
    assert "a.jsonl: empty corpus file, skipped" in caplog.text
    only_empty = tmp_path / "only"
    only_empty.mkdir()
    (only_empty / "c.jsonl").write_text(json.dumps({"text": ""}) + "\n", encoding="utf-8")
    index = BM25Index(RetrievalConfig(), tmp_path)
    with pytest.raises(DataError, match=r"only: no non-empty documents"):
        index.build(CorpusConfig(paths=[str(only_empty)]))


def test_config_parsing_and_validation(tmp_path):
    assert Budget.parse("20%") == Budget(kind="fraction", value=0.2)
    assert Budget.parse("1e6 tokens") == Budget(kind="tokens", value=1e6)
    assert Budget.parse("2000") == Budget(kind="docs", value=2000)
    assert Budget.parse(0.3) == Budget(kind="fraction", value=0.3)
    with pytest.raises(ValueError, match="cannot read budget"):
        Budget.parse("lots")
    config = IssConfig().with_overrides({"influence.layer": "2", "selection.budget": "10 docs"})
    assert config.influence.layer == 2 and config.selection.budget == Budget(kind="docs", value=10)
    with pytest.raises(ValueError, match="layer"):
        IssConfig().with_overrides({"influence.layer": "middle"})
    with pytest.raises(ValueError, match="splits maps the roles"):
        TaskConfig(splits={"train": "train", "validation": "dev"})
    with pytest.raises(ConfigError, match="unknown config key"):
        IssConfig().with_overrides({"nosuch.key": 1})
    path = tmp_path / "c.yaml"
    path.write_text("warmup:\n  epochz: 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="epochz"):
        load_config(path)
    path.write_text("!!python/object/apply:os.system ['echo hacked']\n", encoding="utf-8")
    with pytest.raises(Exception, match="python/object"):
        load_config(path)


def _gzip(path, text: str) -> None:
    import gzip

    with gzip.open(path.with_name(path.name + ".gz"), "wt", encoding="utf-8") as handle:
        handle.write(text)


def _zstd(path, text: str) -> None:
    import zstandard

    data = text.encode()
    frames = [zstandard.ZstdCompressor().compress(data[: len(data) // 2]), zstandard.ZstdCompressor().compress(
        data[len(data) // 2 :])]  # fmt: skip
    path.with_name(path.name + ".zst").write_bytes(b"".join(frames))  # two frames, as datatrove writes


@pytest.mark.parametrize("compress", [_gzip, _zstd], ids=["gz", "zst"])
def test_compressed_corpus_shards_read_as_the_same_rows_as_plain_jsonl(tmp_path, compress):
    """A .jsonl.gz / .jsonl.zst shard is read whole (one unit of work) and yields the rows, ids and sources plain
    JSONL does."""
    records = [{"text": f"document {i}", "source": f"s{i % 3}"} for i in range(25)]
    records[7]["text"] = ""  # an empty document keeps its row id
    chunks = {"a": records[:10], "b": records[10:18], "c": records[18:]}
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    for name, rows in chunks.items():
        lines = "".join(json.dumps(r) + "\n" for r in rows)
        (plain / f"{name}.jsonl").write_text(lines, encoding="utf-8")
        if name == "b":  # a folder may mix compressed and plain shards
            (packed / f"{name}.jsonl").write_text(lines, encoding="utf-8")
        else:
            compress(packed / f"{name}.jsonl", lines)

    def stream(folder):
        batches = list(iter_corpus(CorpusConfig(paths=[str(folder)], shard_size=4)))
        return (
            [int(i) for b in batches for i in b.ids],
            [t for b in batches for t in b.texts],
            [s for b in batches for s in b.sources],
        )

    assert stream(packed) == stream(plain)
    assert 7 not in stream(packed)[0] and len(stream(packed)[0]) == 24
    config = CorpusConfig(paths=[str(packed)], shard_size=4)
    shards = corpus_shards(config)
    compressed = [s for s in shards if s.file.endswith((".gz", ".zst"))]
    assert [s.rows for s in compressed] == [10, 7]  # each compressed file is one shard, whatever shard_size says
    read = [read_shard(s, config) for s in shards]
    assert [int(i) for b in read for i in b.ids] == stream(plain)[0]
    assert [t for b in read for t in b.texts] == stream(plain)[1]


def _stream(config: CorpusConfig) -> tuple[list[int], list[str], list[str]]:
    batches = list(iter_corpus(config))
    return [int(i) for b in batches for i in b.ids], [t for b in batches for t in b.texts], [
        s for b in batches for s in b.sources]  # fmt: skip


def test_saved_and_hub_datasets_read_as_the_same_rows_as_plain_jsonl(tmp_path, monkeypatch):
    """A datasets save_to_disk folder and a dataset loaded by name (here a local folder, offline) are read from
    their Arrow files by row: the same ids and texts as the rows in plain JSONL, in row-offset shards."""
    import datasets

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    records = [{"text": f"document {i}", "source": f"s{i % 3}"} for i in range(23)]
    records[5]["text"] = ""  # an empty document keeps its row id
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    expected = _stream(CorpusConfig(paths=[str(plain)]))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(records).save_to_disk(str(saved), num_shards=3)
    hub_source = tmp_path / "hub_source"
    hub_source.mkdir()
    (hub_source / "train.jsonl").write_bytes(plain.read_bytes())
    for entry in (str(saved), f"hub:{hub_source}"):
        config = CorpusConfig(paths=[entry], shard_size=4)
        assert _stream(config) == expected
        shards = corpus_shards(config)
        assert sum(s.rows for s in shards) == 23 and max(s.rows for s in shards) <= 4
        read = [read_shard(s, config) for s in shards]
        assert [int(i) for b in read for i in b.ids] == expected[0]
        assert [t for b in read for t in b.texts] == expected[1]
    assert len(list(saved.glob("*.arrow"))) > 1  # several Arrow files, read in the saved order


def test_the_large_shared_corpus_streams_from_its_gzip_shards():
    folder = SHARED / "corpus" / "large"
    require_shared_path(folder)
    batch = next(iter_corpus(CorpusConfig(paths=[str(folder)], max_docs=500), batch_size=500))
    assert len(batch.ids) == 500 and all(len(t) >= 50 for t in batch.texts)  # whole documents, 50+ characters


CONFIG_FILES = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml") if "mixtures" not in p.parts)


def test_the_general_mixture_cuts_the_tasks_domains_to_about_five_percent_of_the_large_corpus():
    """configs/mixtures/general.yaml on the real large corpus: arXiv and biomedical sources ~5 % of the documents
    read (the paper's general corpus), every other source whole."""
    large = SHARED / "corpus" / "large"
    require_shared_path(large)
    config = load_config(REPO / "configs" / "gate" / "chemprot-general.yaml").corpus
    counts = Counter(source for batch in iter_corpus(config) for source in batch.sources)
    whole = Counter(
        source for batch in iter_corpus(config.model_copy(update={"mixture": None})) for source in batch.sources
    )
    science = sum(n for source, n in counts.items() if source.startswith(("arxiv_", "bio_")))
    assert 0.03 < science / sum(counts.values()) < 0.06
    assert counts["wiki_en"] == whole["wiki_en"] and counts["usenet_20ng"] == whole["usenet_20ng"]
    assert 0.05 < counts["arxiv_cs"] / whole["arxiv_cs"] < 0.07


def _on_disk(path: str) -> Path:
    """A config's path as a file (``package:NAME/FILE`` resolved inside the installed package)."""
    if not path.startswith(PACKAGE_PREFIX):
        return Path(path)
    checkpoint = Checkpoint.at(path)
    return Path(checkpoint.source) / (checkpoint.gguf_file or "")


@pytest.mark.parametrize("path", CONFIG_FILES, ids=str)
def test_bundled_configs_load_and_point_at_shared_data(path):
    require_shared()
    config = load_config(REPO / path)
    local = [config.task.path, *config.corpus.paths, *(p for p in (config.model.path, config.tokenizer.path) if p)]
    missing = [p for p in local if not _on_disk(p).exists()]
    for part in (p for p in missing if "shared" in Path(p).parts):  # the config is fine; this ../shared lacks it
        require_shared_path(_on_disk(part))
    assert not missing, f"{path} points at missing paths: {missing}"
    if config.pretrain.objective == "joint":  # TLM's rho1 gives every config some task batches and some subset ones
        from iss.training.pretraining import task_batch_schedule

        schedule = task_batch_schedule(config.pretrain.steps * config.pretrain.accumulation, config.pretrain.rho1)
        assert 0 < schedule.sum() < schedule.size
