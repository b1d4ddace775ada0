"""Pipeline-level behaviour: further pretraining from local folders, determinism across run folders, hub loading."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from iss.config import IssConfig, TaskConfig
from iss.data import DataError, _load_hub_task, load_task
from iss.pipeline import Pipeline

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
    assert (moved - before).abs().max() < (moved - torch.randn_like(moved) * 0.02).abs().max()
    scores = pipeline.finetune()
    assert 0 <= scores.summary["test"] <= 1 and scores.summary["metric"] == "micro_f1"


def test_mismatched_tokenizer_and_model_fail_clearly(tmp_path, tokenizer):
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    _checkpoint(tmp_path / "ckpt", 50)
    config = _small_config(tmp_path / "run", tokenizer={"path": str(tmp_path / "tok")},
                           model={"path": str(tmp_path / "ckpt")})  # fmt: skip
    with pytest.raises(ValueError, match="do not belong together"):
        Pipeline(config, show_progress=False).warmup()
    assert not (tmp_path / "run" / "warmup").exists()  # a failed stage leaves no artifact behind
    assert (tmp_path / "run" / "data" / "stage.json").is_file()  # finished stages are kept


def test_hub_loader_reads_a_datasets_source(tmp_path, monkeypatch):
    """The hub path goes through datasets.load_dataset; a local data folder exercises it offline."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    source = tmp_path / "source"
    source.mkdir()
    for split, rows in (("train", 6), ("validation", 2), ("test", 3)):
        lines = [json.dumps({"sentence": f"{split} text {i}", "label": i % 2}) for i in range(rows)]
        (source / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = TaskConfig(path=str(source), text_column="sentence", splits={"train": "train", "dev": "validation",
                                                                          "test": "test"})  # fmt: skip
    raw = _load_hub_task(config.path, config.splits)
    assert {role: table.num_rows for role, (table, _) in raw.items()} == {"train": 6, "dev": 2, "test": 3}
    assert raw["dev"][0].column("sentence").to_pylist() == ["validation text 0", "validation text 1"]

    # A config whose local folder is absent falls back to its hub dataset (what the bundled configs do).
    fallback = TaskConfig(path=str(tmp_path / "absent"), hub=str(source), text_column="sentence")
    task = load_task(fallback)
    assert {role: t.num_rows for role, t in task.splits.items()} == {"train": 6, "dev": 2, "test": 3}
    assert task.labels == ["0", "1"]
    with pytest.raises(DataError, match="not found"):
        load_task(TaskConfig(path=str(tmp_path / "absent")))
