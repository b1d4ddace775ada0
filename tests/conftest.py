"""Shared fixtures: the real data in ../shared/data, and a tiny tokenizer/model trained on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from iss.config.schema import ModelConfig, TokenizerConfig
from iss.modeling.model import TaskModel
from iss.modeling.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CHEMPROT = SHARED / "tasks" / "chemprot"
CORPUS = SHARED / "corpus" / "general.jsonl"
CLI_BUDGET = 300
# pretraining and fine-tuning small enough for CI; shared by every test that runs `iss run` on config_file
TINY_TRAINING = ["--set", "pretrain.steps=6", "--set", "pretrain.batch_size=8", "--set", "pretrain.save_every=3",
                 "--set", "finetune.epochs=1", "--set", "finetune.seeds=[0, 1]"]  # fmt: skip


def require_shared() -> None:
    """Skip a test that needs ../shared/data where it is absent, but fail under CI (CI=true): there the data is
    part of the setup, and a skipped suite would pass without testing anything."""
    if not CORPUS.is_file():
        message = f"shared data not found at {SHARED} (see its README)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI=true, so this is a broken setup, not a skip")
        pytest.skip(message)


def require_shared_path(path: Path) -> None:
    """:func:`require_shared` for one part of ../shared (the large corpus, a model): skipped where this checkout's
    ../shared lacks it, failed under CI, where ../shared is whole."""
    require_shared()
    if not path.exists():
        message = f"{path} is not in this ../shared"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI=true, so this is a broken setup, not a skip")
        pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """The suite's own ``$ISS_CACHE`` (CLI subprocesses inherit it): tiny test runs must not calibrate the time
    estimates of this machine's real runs, nor reuse what those cached."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ISS_CACHE", str(tmp_path_factory.mktemp("iss-cache")))
        yield


@pytest.fixture(scope="session")
def chemprot_texts() -> list[tuple[str, str]]:
    require_shared()
    rows = [json.loads(line) for line in CHEMPROT.joinpath("train.jsonl").open(encoding="utf-8")]
    return [(row["text"], row["label"]) for row in rows]


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    require_shared()
    with CORPUS.open(encoding="utf-8") as handle:
        return [json.loads(next(handle))["text"] for _ in range(3000)]


@pytest.fixture(scope="session")
def tokenizer(chemprot_texts, corpus_texts):
    texts = [t for t, _ in chemprot_texts[:1000]] + corpus_texts[:1000]
    return train_tokenizer(texts, TokenizerConfig(vocab_size=800))


@pytest.fixture()
def tiny_model(tokenizer) -> TaskModel:
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=64)
    return TaskModel.from_scratch(config, tokenizer, num_labels=5).eval()


def iss_command(*args: str) -> subprocess.CompletedProcess:
    """Run the ``iss`` command line in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "iss", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def config_file(tmp_path_factory) -> Path:
    """A small real job: ChemProt (200 train, 40 dev) against the shared corpus, a 2-block tiny BERT."""
    require_shared()
    folder = tmp_path_factory.mktemp("cli")
    config = {
        "run_dir": str(folder / "run"),
        "task": {"name": "chemprot", "path": str(CHEMPROT), "max_train": 200, "max_dev": 40, "metric": "micro_f1"},
        "corpus": {"paths": [str(CORPUS)], "shard_size": 30000},
        "tokenizer": {"vocab_size": 4000, "max_corpus_docs": 20000},
        "retrieval": {"top_k": 10},
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "max_length": 64},
        "warmup": {"epochs": 1, "batch_size": 16},
        "influence": {"top_k": 60, "compute_batch": 64},
        "selection": {"budget": f"{CLI_BUDGET} docs"},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path
