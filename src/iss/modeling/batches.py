"""What the model reads: encoded batches (padded or packed), the candidate, language-model and labelled
batches the stages build, and the per-sample losses influence and training take gradients of.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from iss.errors import ConfigError
from iss.modeling.family import IGNORE, Family

if TYPE_CHECKING:
    from iss.modeling.model import TaskModel

log = logging.getLogger("iss")


def token_counts(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> np.ndarray:
    """Tokens per text, special tokens and truncation left out (so no warning about texts longer than the model)."""
    if not texts:
        return np.asarray([])
    return np.asarray(tokenizer(texts, add_special_tokens=False, return_length=True, verbose=False)["length"])


def length_sorted(lengths: Sequence[int] | np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Row indices in batches of similar length (little padding)."""
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


# ------------------------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """Token ids and attention mask for a batch of texts, plus language-modelling targets and task labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lm_labels: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(move(self.input_ids), move(self.attention_mask), move(self.lm_labels), move(self.labels))


def encode(tokenizer: PreTrainedTokenizerFast, texts: list[str], max_length: int) -> Batch:
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return Batch(encoded["input_ids"], encoded["attention_mask"])


@dataclass(frozen=True)
class PackedDocuments:
    """Documents packed into full rows: one token stream (each document followed by the family's separator,
    [SEP] or end-of-text) cut into rows of ``max_length`` that start with [CLS] (encoders; nothing for causal
    LMs). Only the last row is padded; no document is truncated."""

    input_ids: np.ndarray  # [rows, max_length], padded with the tokenizer's pad id
    lengths: np.ndarray  # [rows] real tokens per row

    @classmethod
    def pack(
        cls, tokenizer: PreTrainedTokenizerFast, texts: list[str], max_length: int, family: Family
    ) -> PackedDocuments:
        prefix, separator = family.packing_tokens(tokenizer)
        if max_length < len(prefix) + 1:
            raise ConfigError(f"packing needs max_length >= {len(prefix) + 1}, got {max_length}")
        documents = tokenizer(texts, add_special_tokens=False)["input_ids"]
        width = max_length - len(prefix)
        stream = np.fromiter(itertools.chain.from_iterable([*doc, separator] for doc in documents), dtype=np.int64)
        rows = max(1, -(-len(stream) // width))
        input_ids = np.full((rows, max_length), tokenizer.pad_token_id, dtype=np.int64)
        input_ids[:, : len(prefix)] = prefix
        body = np.full(rows * width, tokenizer.pad_token_id, dtype=np.int64)
        body[: len(stream)] = stream
        input_ids[:, len(prefix) :] = body.reshape(rows, width)
        lengths = np.full(rows, max_length, dtype=np.int64)
        lengths[-1] = len(prefix) + len(stream) - (rows - 1) * width
        return cls(input_ids, lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray) -> Batch:
        """The rows as a batch, trimmed to its longest row."""
        lengths = self.lengths[rows]
        width = int(lengths.max())
        attention = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        return Batch(torch.from_numpy(self.input_ids[rows, :width].copy()), torch.from_numpy(attention))


def candidate_batch(
    model: TaskModel,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    keys: np.ndarray,
    probability: float,
    seed: int,
    max_length: int,
) -> Batch:
    """Encoded candidate documents with their language-modelling targets (the corpus side of influence)."""
    return language_batch(model, tokenizer, encode(tokenizer, texts, max_length), probability, seed, keys)


def language_batch(
    model: TaskModel, tokenizer: PreTrainedTokenizerFast, batch: Batch, probability: float, seed: int, keys: Iterable
) -> Batch:
    """``batch`` with the targets of the model's language-modelling loss: masked tokens (MLM, one RNG per row
    keyed by ``keys``) or the next tokens (causal)."""
    keys = [int(k) for k in keys]
    input_ids, targets = model.family.language_targets(
        batch.input_ids, batch.attention_mask, tokenizer, probability, seed, keys
    )
    return Batch(input_ids, batch.attention_mask, targets, batch.labels)


def labelled_batch(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], label_ids: np.ndarray, max_length: int
) -> Batch:
    """Encoded task samples with their label ids (the task side of influence)."""
    batch = encode(tokenizer, texts, max_length)
    batch.labels = torch.as_tensor(np.array(label_ids, dtype=np.int64))
    return batch


def per_sample_lm_loss(model: TaskModel, batch: Batch) -> torch.Tensor:
    """Mean language-modelling cross-entropy over each row's target tokens: shape [batch]."""
    masked = batch.lm_labels != IGNORE
    token_loss = nn.functional.cross_entropy(model.lm_logits(batch), batch.lm_labels[masked], reduction="none")
    rows = masked.nonzero()[:, 0]
    totals = torch.zeros(masked.shape[0], dtype=token_loss.dtype, device=token_loss.device)
    return totals.index_add(0, rows, token_loss) / masked.sum(1).clamp(min=1)


def per_sample_task_loss(model: TaskModel, batch: Batch) -> torch.Tensor:
    """Classification cross-entropy per row: shape [batch]."""
    logits = model.task_logits(batch.input_ids, batch.attention_mask)
    return nn.functional.cross_entropy(logits, batch.labels, reduction="none")
