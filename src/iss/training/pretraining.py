"""Pretraining on a selected subset: TLM's joint objective from scratch (task batches every rho1
micro-batches, MLM weighted by rho2), or further pretraining with the LM loss alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from iss.config.schema import PretrainConfig
from iss.data.task import TaskData
from iss.errors import DataError
from iss.modeling.batches import (
    PackedDocuments,
    encode,
    labelled_batch,
    language_batch,
    per_sample_lm_loss,
    per_sample_task_loss,
)
from iss.modeling.model import TaskModel
from iss.runs.processes import processes
from iss.training.loop import LoopSettings, encoded_lengths, epoch_rows, stream_tokens, train_loop

log = logging.getLogger("iss")


def task_batch_schedule(micro_batches: int, rho1: int, objective: str = "joint") -> np.ndarray:
    """Which micro-batches are task batches, as in TLM's ``_get_batch``: every one when rho1 <= 1, else those
    with (s + 1) % rho1 == 0; none under the MLM-only objective."""
    steps = np.arange(micro_batches)
    if objective == "mlm":
        return np.zeros(micro_batches, bool)
    return np.ones(micro_batches, bool) if rho1 <= 1 else (steps + 1) % rho1 == 0


def pretrain(
    model: TaskModel,
    tokenizer: PreTrainedTokenizerFast,
    subset_texts: list[str],
    task: TaskData,
    config: PretrainConfig,
    max_length: int,
    seed: int,
    device: torch.device,
    checkpoint_dir: Path | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """TLM's joint objective: MLM on subset batches; (rho2 * MLM + task) / (rho2 + 1) on task batches.

    Task batches are masked task texts with their labels (see :func:`task_batch_schedule`); with
    ``objective="mlm"`` every batch is a subset batch (further pretraining). With ``packing`` the subset batches
    are rows of :class:`PackedDocuments`. Batches and masks are a pure function of (seed, micro-batch index), so
    resuming replays the same sequence. ``real_tokens`` counts the non-padding tokens the model saw.
    """
    texts, labels = task.texts("train"), task.label_ids("train")
    if not subset_texts:
        raise DataError("the subset is empty: nothing to pretrain on")
    micro_batches = config.steps * config.accumulation
    is_task = task_batch_schedule(micro_batches, config.rho1, config.objective)
    position = np.where(is_task, np.cumsum(is_task) - 1, np.cumsum(~is_task) - 1)
    packed = PackedDocuments.pack(tokenizer, subset_texts, max_length, model.family) if config.packing else None
    subset_rows = len(packed) if packed is not None else len(subset_texts)
    model.to(device)

    group = processes()

    def step_loss(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        index = step * config.accumulation + micro
        if is_task[index]:  # rows of the task split, or of the subset / its packs
            everyone = epoch_rows(len(texts), config.batch_size, seed, int(position[index]))
        else:
            everyone = epoch_rows(subset_rows, config.batch_size, seed + 1, int(position[index]))
        rows = group.share(everyone)
        if is_task[index]:
            batch = labelled_batch(tokenizer, [texts[i] for i in rows], labels[rows], max_length)
            keys = 2 * (rows * micro_batches + index)  # distinct per (source, row, micro-batch): even = task
        else:
            batch = packed.batch(rows) if packed else encode(tokenizer, [subset_texts[i] for i in rows], max_length)
            keys = 2 * (rows * micro_batches + index) + 1
        batch = language_batch(model, tokenizer, batch, config.mlm_probability, seed, keys).to(device)
        mlm_loss = group.mean(per_sample_lm_loss(model, batch), everyone)
        if not is_task[index]:
            return mlm_loss, {"mlm": mlm_loss.item()}
        task_loss = group.mean(per_sample_task_loss(model, batch), everyone)
        loss = (config.rho2 * mlm_loss + task_loss) / (config.rho2 + 1)
        return loss, {"task_mlm": mlm_loss.item(), "task": task_loss.item()}

    every = max(1, config.steps // 20)
    settings = LoopSettings(config, config.steps, config.accumulation, config.save_every, "pretrain", every)
    summary = train_loop(model, settings, step_loss, seed, checkpoint_dir, show_progress)
    summary["task_micro_batches"] = int(is_task.sum())
    summary["subset_micro_batches"] = int((~is_task).sum())
    summary["tokens"] = micro_batches * config.batch_size * max_length  # as the paper counts them, for FLOPs
    subset_lengths = packed.lengths if packed is not None else encoded_lengths(tokenizer, subset_texts, max_length)
    summary["real_tokens"] = stream_tokens(
        encoded_lengths(tokenizer, texts, max_length), config.batch_size, seed, int(is_task.sum())
    ) + stream_tokens(subset_lengths, config.batch_size, seed + 1, int((~is_task).sum()))
    # non-padding tokens trained on: what equal-compute comparisons count
    if packed is not None:
        summary["packed_rows"] = len(packed)
    return summary


def unigram_entropy(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> float:
    """Cross-entropy (nats) of the texts' own unigram distribution: the MLM loss of a model that has learned
    word frequencies and nothing else, the level a pretraining curve must fall clearly below."""
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    counts = np.bincount(np.asarray(ids, np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
