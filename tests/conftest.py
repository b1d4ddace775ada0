"""Shared fixtures: the real data in ../shared/data, and a tiny tokenizer/model trained on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from iss.config import ModelConfig, TokenizerConfig
from iss.model import TaskMLMModel, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CHEMPROT = SHARED / "tasks" / "chemprot"
CORPUS = SHARED / "corpus" / "general.jsonl"


def require_shared() -> None:
    if not CORPUS.is_file():
        pytest.skip(f"shared data not found at {SHARED} (see its README)")


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
def tiny_model(tokenizer) -> TaskMLMModel:
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=64)
    return TaskMLMModel.from_scratch(config, tokenizer, num_labels=5).eval()
