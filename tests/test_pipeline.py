"""Pipeline-level behaviour: further pretraining from local folders, determinism across run folders, hub loading."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from iss.config.schema import IssConfig, TaskConfig
from iss.data.corpus import iter_corpus
from iss.data.task import load_task
from iss.errors import ConfigError, DataError
from iss.modeling.model import TaskModel
from iss.pipeline.run import Pipeline
from iss.runs import folder as runs
from iss.runs.folder import RunFolder
from iss.selection.budget import BudgetError
from iss.stages.warmup import HEAD_SAMPLE_SEED_OFFSET

from .conftest import CHEMPROT, CORPUS, require_shared


def _small_config(run_dir, **sections) -> IssConfig:
    require_shared()
    base = {
        "run_dir": str(run_dir),
        "task": {"path": str(CHEMPROT), "max_train": 40, "max_dev": 8},
        "corpus": {"paths": [str(CORPUS)], "max_docs": 2000, "shard_size": 1000},
        "tokenizer": {"vocab_size": 600, "max_corpus_docs": 2000},
        "retrieval": {"top_k": 5},
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "max_length": 48},
        "warmup": {"epochs": 1, "batch_size": 8},
        "influence": {"top_k": 40, "compute_batch": 32},
        "selection": {"budget": "30 docs"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return IssConfig.model_validate(base)


def test_two_runs_on_one_folder_run_a_stage_once(tmp_path):
    """Two runs of one folder at once (say, two lists of methods) reach the same stage: the second waits for the
    first and reuses its artifact instead of writing the same temporary folder under it."""
    config = _small_config(tmp_path / "run")
    first, second = Pipeline(config, show_progress=False), Pipeline(config, show_progress=False)
    calls, started = [], threading.Event()

    def body(folder, summary):
        calls.append(folder)
        started.set()
        time.sleep(0.5)  # the second run arrives while this one is writing
        (folder / "out.txt").write_text("done", encoding="utf-8")

    results = {}
    worker = threading.Thread(target=lambda: results.update(first=first.stage("probe", {"k": 1}, body)))
    worker.start()
    started.wait(5)
    results["second"] = second.stage("probe", {"k": 1}, body)
    worker.join()
    assert len(calls) == 1 and not results["first"].reused and results["second"].reused
    assert (results["second"].path / "out.txt").read_text(encoding="utf-8") == "done"


def test_same_seed_gives_the_same_subset_in_fresh_run_folders(tmp_path, tokenizer):
    """Everything after the tokenizer is bit-reproducible for a seed (WordPiece training itself breaks ties in
    hash order, so the runs share one tokenizer folder, as ``tokenizer.path`` lets users do)."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    subsets = []
    for name in ("a", "b"):
        config = _small_config(tmp_path / name, tokenizer={"path": str(tmp_path / "tok")})
        result = Pipeline(config, show_progress=False).select()
        subsets.append(pq.read_table(result.path / "subset.parquet"))
    assert subsets[0].num_rows == 30
    assert subsets[0].column("corpus_id").equals(subsets[1].column("corpus_id"))
    assert subsets[0].column("score").equals(subsets[1].column("score"))
    assert subsets[0].column("chosen_by").equals(subsets[1].column("chosen_by"))


def _checkpoint(folder, vocab_size: int) -> BertForMaskedLM:
    torch.manual_seed(1)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    model = BertForMaskedLM(config)
    model.save_pretrained(str(folder))
    return model


def test_further_pretraining_setting_uses_local_tokenizer_and_checkpoint(tmp_path, tokenizer):
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    original = _checkpoint(tmp_path / "ckpt", len(tokenizer))
    config = _small_config(
        tmp_path / "run",
        tokenizer={"path": str(tmp_path / "tok")},
        model={"path": str(tmp_path / "ckpt")},
        influence={"layer": "embeddings"},
        pretrain={"steps": 3, "batch_size": 4},
        finetune={"epochs": 1},
    )
    pipeline = Pipeline(config, show_progress=False)
    result = pipeline.select()
    assert pq.read_table(result.path / "subset.parquet").num_rows == 30
    assert pipeline.results["tokenizer"].summary["vocab_size"] == len(tokenizer)
    warmed = AutoModelForMaskedLM.from_pretrained(str(pipeline.results["warmup"].path / "model"))
    before = original.bert.encoder.layer[0].output.dense.weight
    after = warmed.bert.encoder.layer[0].output.dense.weight
    assert before.shape == after.shape and not torch.allclose(before, after)

    # further pretraining starts from the checkpoint (not from scratch) and writes a loadable model
    pretrained = pipeline.pretrain()
    further = AutoModelForMaskedLM.from_pretrained(str(pretrained.path / "model"))
    moved = further.bert.encoder.layer[0].output.dense.weight
    assert moved.shape == before.shape and not torch.allclose(before, moved)
    torch.manual_seed(0)  # the pretraining seed: what a model wrongly started from scratch would begin as
    fresh = BertForMaskedLM(original.config).bert.encoder.layer[0].output.dense.weight
    assert (moved - before).norm() < 0.5 * (fresh - before).norm()
    scores = pipeline.finetune()
    assert 0 <= scores.summary["test"] <= 1 and scores.summary["metric"] == "micro_f1"


def test_a_fitted_mlm_head_leaves_the_encoder_alone_and_every_model_starts_from_it(tmp_path, tokenizer, monkeypatch):
    """model.mlm_head_steps: the head is fitted once on a corpus sample with the encoder frozen (bit-identical to
    the checkpoint), and warm-up, pretraining and fine-tuning without pretraining all load that model."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    original = _checkpoint(tmp_path / "ckpt", len(tokenizer))
    config = _small_config(
        tmp_path / "run",
        tokenizer={"path": str(tmp_path / "tok")},
        model={"path": str(tmp_path / "ckpt"), "mlm_head_steps": 12},
        pretrain={"steps": 2, "batch_size": 8, "objective": "mlm", "save_every": 0},
        finetune={"epochs": 1, "seeds": [0]},
        evaluation={"methods": ["tlm", "none"], "mechanism_steps": 0},
    )
    pipeline = Pipeline(config, show_progress=False)
    head = pipeline.mlm_head()
    curve = head.summary["curve"]
    assert head.summary["sample_docs"] == 12 * 8 and curve[-1]["mlm"] < curve[0]["mlm"]
    fitted = AutoModelForMaskedLM.from_pretrained(str(head.path / "model"))
    for (name, before), (_, after) in zip(
        original.bert.named_parameters(), fitted.bert.named_parameters(), strict=True
    ):
        assert torch.equal(before, after), name
    moved = original.cls.predictions.transform.dense.weight, fitted.cls.predictions.transform.dense.weight
    assert not torch.equal(*moved)

    loaded = []
    load = TaskModel.load.__func__
    monkeypatch.setattr(
        TaskModel, "load", classmethod(lambda cls, path, *a: loaded.append(Path(path)) or load(cls, path, *a))
    )
    pipeline.warmup(), pipeline.pretrain(), pipeline.finetune(0, pretrained=False)
    assert loaded.count(head.path / "model") == 3 and Path(config.model.path) not in loaded
    plain = Pipeline(config.with_overrides({"model.mlm_head_steps": 0}), show_progress=False)
    assert plain.mlm_head() is None and plain.warmup().fingerprint != pipeline.warmup().fingerprint


def test_a_base_fit_trains_the_top_blocks_on_a_sample_apart_from_the_random_corpus_control(tmp_path, tokenizer):
    """model.mlm_head_blocks: the head fit also trains the top blocks (a shared base), the embeddings and lower
    blocks stay the checkpoint's, and its sample is not the random-corpus control's first documents."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    original = _checkpoint(tmp_path / "ckpt", len(tokenizer))
    config = _small_config(
        tmp_path / "run",
        tokenizer={"path": str(tmp_path / "tok")},
        model={"path": str(tmp_path / "ckpt"), "mlm_head_steps": 4, "mlm_head_blocks": 1},
        pretrain={"batch_size": 8},
    )
    pipeline = Pipeline(config, show_progress=False)
    fitted = AutoModelForMaskedLM.from_pretrained(str(pipeline.mlm_head().path / "model"))
    changed = {
        name.split(".")[2] if name.startswith("encoder.layer.") else name.split(".")[0]
        for (name, before), (_, after) in zip(
            original.bert.named_parameters(), fitted.bert.named_parameters(), strict=True
        )
        if not torch.equal(before, after)
    }
    assert changed == {"1"}  # block 2 of 2 (0-based 1) only
    sample = pipeline.corpus_sample("docs", 32, 0.0, config.seed + HEAD_SAMPLE_SEED_OFFSET)
    control = pq.read_table(pipeline.variant({"selection.method": "random-corpus"}).select().path / "subset.parquet")
    shared = set(sample.column("corpus_id").to_pylist()) & set(control.column("corpus_id").to_pylist())
    assert len(shared) < 5  # 32 and 30 of 2,000 documents: ~0.5 by chance, 30 if they were the same draw


def test_an_exported_run_continues_elsewhere_reusing_what_it_carries(tmp_path, tokenizer, monkeypatch):
    """`export` packs the chosen finished stages with their fingerprints; `import_archive` into a fresh folder
    lets the same config reuse them (nothing recomputed), reports the config keys where the runs differ, keeps
    stages the folder has, and refuses an archive of another cache version."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    config = _small_config(tmp_path / "first", tokenizer={"path": str(tmp_path / "tok")})
    first = Pipeline(config.with_overrides({"selection.method": "tlm"}), show_progress=False)
    first.select()
    archive = tmp_path / "carry" / "run.tar.gz"
    names = first.run.export(archive, skip=["tokenizer"])
    assert names == ["data", "retrieval", "select-tlm"]

    elsewhere = config.with_overrides({"run_dir": str(tmp_path / "second"), "selection.method": "tlm"})
    folder = RunFolder(elsewhere.run_dir)
    report = folder.import_archive(archive, elsewhere.model_dump(mode="json"))
    assert report["imported"] == names and report["kept"] == [] and report["config_differs"] == ["run_dir"]
    second = Pipeline(elsewhere, show_progress=False)
    second.select()
    assert second.results["select-tlm"].reused and second.results["retrieval"].reused
    assert not second.results["tokenizer"].reused  # not carried: made here, the same fingerprint
    same = pq.read_table(second.results["select-tlm"].path / "subset.parquet").column("corpus_id")
    assert same.equals(pq.read_table(first.results["select-tlm"].path / "subset.parquet").column("corpus_id"))
    assert folder.import_archive(archive)["kept"] == names  # already there: kept as they are

    monkeypatch.setattr(runs, "CACHE_VERSION", "9.9")
    with pytest.raises(ConfigError, match="whose stage fingerprints"):
        RunFolder(tmp_path / "third").import_archive(archive)


def test_the_random_corpus_control_has_the_mixtures_source_shares_not_the_corpus(tmp_path, tokenizer):
    """Under a mixture the control samples the mixture: sources cut to 10 % of their documents are as rare in the
    sample as in the mixture, not as common as in the corpus (the mixture's draws and the sample's order are
    independent streams)."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    mixture = {"weights": {"bio_*": 0.1}}
    config = _small_config(
        tmp_path / "run",
        tokenizer={"path": str(tmp_path / "tok")},
        task={"max_train": 200},
        retrieval={"top_k": 30},
        corpus={"max_docs": None, "mixture": mixture},
        selection={"method": "random-corpus", "budget": "1500 docs"},
    )
    pipeline = Pipeline(config, show_progress=False)
    whole = Counter(s for b in iter_corpus(config.corpus.model_copy(update={"mixture": None})) for s in b.sources)
    sample = Counter(pq.read_table(pipeline.select().path / "subset.parquet").column("source").to_pylist())
    bio = lambda counts: sum(n for s, n in counts.items() if s.startswith("bio")) / sum(counts.values())  # noqa: E731
    expected = 0.1 * bio(whole) / (0.1 * bio(whole) + 1 - bio(whole))  # 48 % of the corpus: 8 % of the mixture
    assert abs(bio(sample) - expected) < 0.03 and bio(whole) - bio(sample) > 0.3


def test_a_missing_layer_or_a_budget_over_the_pool_fails_before_warm_up(tmp_path, tokenizer):
    """Checks the config, the data and the model's config can answer come before the first expensive stage:
    ISS's select and run_all refuse influence.layer 99 and a budget larger than the pool with no warm-up made."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    config = _small_config(tmp_path / "run", tokenizer={"path": str(tmp_path / "tok")})
    with pytest.raises(ConfigError, match=r"influence.layer 99 is out of range: the model has blocks 1..2"):
        Pipeline(config.with_overrides({"influence.layer": 99}), show_progress=False).select()
    with pytest.raises(BudgetError, match="larger than the candidate pool"):
        Pipeline(config.with_overrides({"selection.budget": "99999 docs"}), show_progress=False).select()
    sweep = config.with_overrides({"evaluation.budgets": ["10 docs", "1e9 tokens"], "evaluation.methods": ["iss"]})
    with pytest.raises(BudgetError, match="1000000000 tokens is larger"):
        Pipeline(sweep, show_progress=False).run_all()
    assert not (tmp_path / "run" / "warmup").exists() and (tmp_path / "run" / "retrieval").is_dir()


def test_mismatched_tokenizer_and_model_fail_clearly(tmp_path, tokenizer):
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    _checkpoint(tmp_path / "ckpt", 50)
    config = _small_config(tmp_path / "run", tokenizer={"path": str(tmp_path / "tok")},
                           model={"path": str(tmp_path / "ckpt")})  # fmt: skip
    with pytest.raises(ConfigError, match="do not belong together"):
        Pipeline(config, show_progress=False).warmup()
    assert not (tmp_path / "run" / "warmup").exists()  # a failed stage leaves no artifact behind
    assert (tmp_path / "run" / "data" / "stage.json").is_file()  # finished stages are kept
    with_head = config.with_overrides({"model.mlm_head_steps": 5, "evaluation.methods": ["tlm"]})
    with pytest.raises(ConfigError, match="do not belong together"):
        Pipeline(with_head, show_progress=False).run_all()  # before the head fit, the first expensive stage
    assert not (tmp_path / "run" / "mlm-head").exists()


def test_hub_loader_reads_a_datasets_source(tmp_path, monkeypatch):
    """The hub path goes through datasets.load_dataset; a local data folder exercises it offline."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    source = tmp_path / "source"
    source.mkdir()
    for split, rows in (("train", 6), ("validation", 2), ("test", 3)):
        lines = [json.dumps({"sentence": f"{split} text {i}", "label": i % 2}) for i in range(rows)]
        (source / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # A config whose local folder is absent falls back to its hub dataset (what the bundled configs do).
    fallback = TaskConfig(path=str(tmp_path / "absent"), hub=str(source), text_column="sentence")
    task = load_task(fallback)
    assert {role: t.num_rows for role, t in task.splits.items()} == {"train": 6, "dev": 2, "test": 3}
    assert task.labels == ["0", "1"]
    assert task.texts("dev") == ["validation text 0", "validation text 1"]  # hub_splits: dev -> validation
    with pytest.raises(DataError, match="not found"):
        load_task(TaskConfig(path=str(tmp_path / "absent")))


def test_controls_random_corpus_and_iss_bottom(tmp_path, tokenizer):
    """random-corpus samples the whole corpus (not the pool), the same ids however the corpus is batched;
    iss-bottom takes the pool's least influential candidates, which ISS's subset outscores."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    config = _small_config(tmp_path / "run", tokenizer={"path": str(tmp_path / "tok")})
    pipeline = Pipeline(config, show_progress=False)
    iss_subset = pq.read_table(pipeline.select().path / "subset.parquet")
    pool = set(pq.read_table(pipeline.results["retrieval"].path / "pool.parquet").column("corpus_id").to_pylist())

    corpus = pq.read_table(pipeline.variant({"selection.method": "random-corpus"}).select().path / "subset.parquet")
    ids = corpus.column("corpus_id").to_pylist()
    assert len(ids) == len(set(ids)) == 30 and all(0 <= i < 2000 for i in ids)
    assert len(set(ids) - pool) > 15  # the pool is a small part of the corpus: most of a uniform sample is outside
    rebatched = Pipeline(config.with_overrides({"corpus.shard_size": 333, "run_dir": str(tmp_path / "other")}), False)
    other = pq.read_table(rebatched.variant({"selection.method": "random-corpus"}).select().path / "subset.parquet")
    assert other.column("corpus_id").to_pylist() == ids

    bottom = pq.read_table(pipeline.variant({"selection.method": "iss-bottom"}).select().path / "subset.parquet")
    influence = pipeline.results["influence"].path
    means = pq.read_table(influence / "unit_scores.parquet").column("mean_score").to_numpy()
    unit_of = {
        doc: unit
        for unit, docs in enumerate(pq.read_table(influence / "pool_units.parquet").column("corpus_ids").to_pylist())
        for doc in docs
    }
    bottom_means = sorted(means[unit_of[d]] for d in bottom.column("corpus_id").to_pylist())
    assert bottom_means == sorted(means)[:30]  # exactly the 30 lowest (B_p = 1: a unit is a document)
    assert bottom.column("score").to_pylist() == pytest.approx(
        [means[unit_of[d]] for d in bottom["corpus_id"].to_pylist()]
    )
    iss_means = [means[unit_of[d]] for d in iss_subset.column("corpus_id").to_pylist()]
    assert sum(iss_means) / 30 > bottom_means[-1]


def test_batched_units_are_neighbours_in_bm25_order_and_the_subset_says_who_rode_along(tmp_path, tokenizer):
    """B_p > 1: units are consecutive pool documents in BM25 order (one query's hits side by side), not a random
    draw; every subset row names the other documents of the unit it entered with. B_p = 1 has none."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    config = _small_config(tmp_path / "run", tokenizer={"path": str(tmp_path / "tok")})
    batched = Pipeline(config.with_overrides({"influence.pool_batch": 3}), show_progress=False)
    assert batched.influence_name == "influence-bp3-bt1"
    hits = pq.read_table(batched.retrieval().path / "hits.parquet").to_pandas()
    query_of = hits.sort_values(["query", "rank"]).drop_duplicates("corpus_id").set_index("corpus_id")["query"]
    units = pq.read_table(batched.influence().path / "pool_units.parquet").column("corpus_ids").to_pylist()
    assert {len(unit) for unit in units[:-1]} == {3}
    assert [d for unit in units for d in unit] == query_of.index.tolist()  # query by query, best hit first
    queries_per_unit = [len({query_of[d] for d in unit}) for unit in units]
    subset = pq.read_table(batched.select().path / "subset.parquet").to_pylist()
    unit_of = {d: tuple(unit) for unit in units for d in unit}
    for row in subset:
        assert sorted([row["corpus_id"], *row["unit_mates"]]) == sorted(unit_of[row["corpus_id"]])
    shuffled = batched.variant({"influence.pool_grouping": "random"})
    assert shuffled.influence_name == "influence-bp3-bt1-random"
    random_units = pq.read_table(shuffled.influence().path / "pool_units.parquet").column("corpus_ids").to_pylist()
    random_single = sum(len({query_of[d] for d in unit}) == 1 for unit in random_units)
    assert random_single < sum(q == 1 for q in queries_per_unit) / 2
    single = pq.read_table(Pipeline(config, show_progress=False).select().path / "subset.parquet")
    assert all(mates == [] for mates in single.column("unit_mates").to_pylist())
    summary = Pipeline(config, show_progress=False).select().summary
    assert summary["docs_in_shared_units"] == 0 and sum(summary["sources"].values()) == pytest.approx(1, abs=1e-3)


def test_pretrain_seeds_give_every_pretraining_every_fine_tuning_seed(tmp_path, tokenizer):
    """evaluation.pretrain_seeds x finetune.seeds: one pretraining per seed, each fine-tuned with every seed; the
    runs carry their pretraining seed, a pretraining seed equal to the fine-tuning seed keeps the plain name."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    config = _small_config(
        tmp_path / "run",
        tokenizer={"path": str(tmp_path / "tok")},
        pretrain={"steps": 2, "batch_size": 4, "objective": "mlm", "save_every": 0},
        finetune={"epochs": 1, "batch_size": 8, "seeds": [0, 1], "trainable_blocks": 1},
        evaluation={"methods": ["tlm", "none"], "pretrain_seeds": [0, 2]},
    )
    assert config.seed_pairs() == [(0, 0), (0, 1), (2, 0), (2, 1)]
    pipeline = Pipeline(config, show_progress=False)
    results = json.loads((pipeline.run_all().path / "results.json").read_text())
    runs = {(r["method"], r["pretrain_seed"], r["seed"]) for r in results["runs"]}
    assert runs == {("tlm", 0, 0), ("tlm", 0, 1), ("tlm", 2, 0), ("tlm", 2, 1), ("none", None, 0), ("none", None, 1)}
    names = set(pipeline.results)
    assert {"pretrain-tlm-seed0", "pretrain-tlm-seed2"} <= names and "pretrain-tlm-seed1" not in names
    assert {"finetune-tlm-seed0", "finetune-tlm-pretrain0-seed1", "finetune-tlm-pretrain2-seed0"} <= names
    assert "finetune-tlm-seed1" not in names
    first, second = pipeline.results["finetune-tlm-seed0"], pipeline.results["finetune-tlm-pretrain2-seed0"]
    assert first.summary["test"] != second.summary["test"] or first.fingerprint != second.fingerprint


@pytest.mark.slow
def test_run_all_compares_every_method_with_controls_and_paired_differences(tmp_path, tokenizer):
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    methods = ["iss", "iss-cosine", "tlm", "random", "random-corpus", "iss-bottom", "none"]
    config = _small_config(
        tmp_path / "run",
        tokenizer={"path": str(tmp_path / "tok")},
        pretrain={"steps": 3, "batch_size": 4, "objective": "mlm", "save_every": 0},
        finetune={"epochs": 1, "batch_size": 8, "seeds": [0, 1, 2], "trainable_blocks": 1},
        evaluation={
            "methods": methods,
            "mechanism_steps": 2,
            "mechanism_repeats": 2,
            "repeat_pretraining": False,
        },
    )
    pipeline = Pipeline(config, show_progress=False)
    results = json.loads((pipeline.run_all().path / "results.json").read_text())
    assert {(r["method"], r["seed"]) for r in results["runs"]} == {(m, s) for m in methods for s in (0, 1, 2)}
    # one pretraining per method (repeat_pretraining off): every seed fine-tunes the seed-0 model
    assert not any(name.startswith("pretrain-") and not name.endswith("seed0") for name in pipeline.results)
    assert {"select-iss", "select-iss-cosine", "influence", "influence-cosine"} <= set(pipeline.results)
    iss_ids = pq.read_table(pipeline.results["select-iss"].path / "subset.parquet").column("corpus_id")
    cosine_ids = pq.read_table(pipeline.results["select-iss-cosine"].path / "subset.parquet").column("corpus_id")
    assert not iss_ids.equals(cosine_ids)
    comparisons = {line["comparison"] for line in results["differences"]}
    assert {"iss - tlm", "iss - random", "tlm - random-corpus", "iss - iss-bottom", "iss-cosine - iss"} <= comparisons
    for line in results["differences"]:  # one pretraining per method: one unit, a mean and no interval
        assert line["seeds"] == 1 and line["verdict"] == "n/a" and math.isfinite(line["mean"])
    assert {row["method"] for row in results["subsets"]} == set(methods) - {"none"}
    assert all(row["mean_tokens"] == pytest.approx(row["tokens"] / row["docs"], abs=0.01) for row in results["subsets"])
    checks = Counter(row["method"] for row in results["mechanism"])
    assert checks == {method: 1 if method == "none" else 2 for method in methods}  # the warmed-up model: once
    mechanism = {(row["method"], row["repeat"]): row for row in results["mechanism"]}
    assert all(0 < row["test_task_loss"] < 10 and 0 <= row["test_f1"] <= 1 for row in mechanism.values())
    assert mechanism["none", 0].get("steps") is None and mechanism["iss", 1]["steps"] == 2
    paired = {line["comparison"]: line for line in results["mechanism_differences"]}
    assert paired["iss - tlm"]["repeats"] == 2
    expected = sum(mechanism["tlm", r]["test_task_loss"] - mechanism["iss", r]["test_task_loss"] for r in (0, 1)) / 2
    assert paired["iss - tlm"]["mean"] == pytest.approx(expected, abs=1e-4)
    markdown = (pipeline.results["results"].path / "results.md").read_text()
    assert "Paired differences" in markdown and "random (whole corpus)" in markdown
    assert "paired over repeats" in markdown


def test_mechanism_repeats_draw_their_own_batches_and_keep_the_single_checks_stage(tmp_path, tokenizer):
    """evaluation.mechanism_repeats: repeat r trains on the subset with seed + r (another loss), repeat 0 is the
    single check's stage (a folder checked once is reused), and the warmed-up model alone is scored once."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    config = _small_config(
        tmp_path / "run",
        tokenizer={"path": str(tmp_path / "tok")},
        pretrain={"batch_size": 4},
        evaluation={"methods": ["tlm", "none"], "mechanism_steps": 3},
    )
    single = Pipeline(config, show_progress=False).method_variant("tlm").mechanism()
    repeated = Pipeline(config.with_overrides({"evaluation.mechanism_repeats": 3}), show_progress=False)
    checks = repeated.method_variant("tlm").mechanism_checks()
    assert [check.name for check in checks] == ["mechanism-tlm", "mechanism-tlm-repeat1", "mechanism-tlm-repeat2"]
    assert checks[0].reused and checks[0].fingerprint == single.fingerprint
    assert not checks[1].reused and not checks[2].reused
    assert len({check.summary["mlm"] for check in checks}) == 3  # each repeat saw other batches and masks
    assert [check.name for check in repeated.mechanism_checks(pretrained=False)] == ["mechanism-none"]


def test_bf16_precision_runs_every_model_stage_and_keeps_its_own_fingerprints(tmp_path, tokenizer):
    """precision: bf16 (autocast; the GPU path, run here on CPU) selects, pretrains and fine-tunes; model stages
    are fingerprinted by precision, so fp32 artifacts are never reused for bf16 ones."""
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    fp32 = _small_config(
        tmp_path / "run",
        tokenizer={"path": str(tmp_path / "tok")},
        pretrain={"steps": 2, "batch_size": 4},
        finetune={"epochs": 1, "seeds": [0]},
    )
    bf16 = Pipeline(fp32.with_overrides({"precision": "bf16"}), show_progress=False)
    subset = pq.read_table(bf16.select().path / "subset.parquet")
    assert subset.num_rows == 30
    scores = bf16.finetune(0)
    assert 0 <= scores.summary["test"] <= 1
    reference = Pipeline(fp32, show_progress=False)
    assert reference.data().fingerprint == bf16.results["data"].fingerprint  # no model: shared
    assert reference.warmup().fingerprint != bf16.results["warmup"].fingerprint
