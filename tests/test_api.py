"""The Python API: ``import iss`` exports the library, ``iss.select`` takes in-memory data, the README runs."""

from __future__ import annotations

import gzip
import json
import re

import datasets
import numpy as np
import pytest

import iss

from .conftest import CHEMPROT, CORPUS, REPO, require_shared

TINY = {
    "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2, "model.intermediate_size": 64,
    "model.max_length": 48, "tokenizer.vocab_size": 600, "warmup.epochs": 1, "warmup.batch_size": 8,
    "retrieval.top_k": 5, "influence.top_k": 40,
}  # fmt: skip


def test_public_api_is_exported():
    assert re.fullmatch(r"\d+\.\d+\.\d+", iss.__version__)
    for name in iss.__all__:
        assert getattr(iss, name) is not None
    assert set(iss.SELECTION) == {"iss", "tlm", "random", "random-corpus", "iss-bottom", "dsir", "knn"}
    with pytest.raises(iss.ConfigError, match="unknown config key"):
        iss.IssConfig().with_overrides({"influence.nope.x": 1})


def _rows(split: str, n: int) -> list[dict]:
    with (CHEMPROT / f"{split}.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def test_select_takes_in_memory_task_and_corpus_and_reuses_its_stages(tmp_path):
    require_shared()
    train = _rows("train", 60)
    dev = [row for row in _rows("dev", 40) if row["label"] in {r["label"] for r in train}][:8]
    task = {
        "train": {"text": [r["text"] for r in train], "label": [r["label"] for r in train]},  # dict of columns
        "validation": datasets.Dataset.from_list(dev),  # a Dataset, under the hub's name for dev
    }
    with CORPUS.open(encoding="utf-8") as handle:
        corpus = [json.loads(next(handle))["text"] for _ in range(1500)]  # a list of texts
    run_dir = tmp_path / "run"
    subset = iss.select(task, corpus, budget="30 docs", run_dir=run_dir, overrides=TINY)
    assert isinstance(subset, datasets.Dataset) and subset.num_rows == 30
    assert {"corpus_id", "text", "score", "chosen_by"} <= set(subset.column_names)
    assert all(corpus[row["corpus_id"]] == row["text"] for row in subset)  # ids are positions in the list
    assert all(chooser.startswith("dev:") for row in subset for chooser in row["chosen_by"])

    again = iss.select(task, corpus, budget="30 docs", run_dir=run_dir, overrides=TINY)
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    assert all(stage["reused"] for stage in manifest["stages"].values())
    assert again["corpus_id"] == subset["corpus_id"]

    folder = run_dir / "select-iss"
    assert np.load(folder / "ids.npy").tolist() == subset["corpus_id"]  # the export forms of the subset
    loaded = datasets.load_dataset("parquet", data_files=str(folder / "subset.parquet" / "*.parquet"), split="train")
    assert loaded["corpus_id"] == subset["corpus_id"]
    assert [p.name for p in (folder / "subset.parquet").iterdir()] == ["part-00000-of-00001.parquet"]
    with gzip.open(folder / "subset.jsonl.gz", "rt", encoding="utf-8") as handle:
        assert [json.loads(line)["text"] for line in handle] == subset["text"]

    tlm = iss.select(task, corpus, method="tlm", budget="30 docs", run_dir=run_dir, overrides=TINY)
    assert tlm.num_rows == 30 and all(c.startswith("train:") for row in tlm for c in row["chosen_by"])


def test_readme_python_example_runs(tmp_path, monkeypatch):
    require_shared()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "runs/api-example" in code
    monkeypatch.chdir(REPO)
    exec(compile(code.replace("runs/api-example", str(tmp_path / "run")), "README.md", "exec"), {})
    subset = datasets.Dataset.from_parquet(str(tmp_path / "run" / "select-iss" / "subset.parquet" / "*.parquet"))
    assert subset.num_rows == 200
