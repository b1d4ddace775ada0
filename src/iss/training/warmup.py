"""The warm-up (Algorithm 1, line 2): the model trains on the task with its LM loss plus the task loss,
so that influence is measured on a model that knows the task.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import PreTrainedTokenizerFast

from iss.config.schema import WarmupConfig
from iss.data.task import TaskData
from iss.modeling.batches import (
    labelled_batch,
    language_batch,
    per_sample_lm_loss,
    per_sample_task_loss,
)
from iss.modeling.model import TaskModel
from iss.runs.processes import processes
from iss.training.finetuning import accuracy
from iss.training.loop import LoopSettings, TrainingBatches, train_loop

log = logging.getLogger("iss")


def warmup_train(
    model: TaskModel,
    tokenizer: PreTrainedTokenizerFast,
    task: TaskData,
    config: WarmupConfig,
    max_length: int,
    seed: int,
    device: torch.device,
    show_progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` in place on the task's train split with MLM + task loss; returns losses and dev accuracy."""
    texts, labels = task.texts("train"), task.label_ids("train")
    batches = TrainingBatches(tokenizer, texts, config.batch_size, seed, config.length_buckets)
    total_steps = max(1, math.ceil(config.epochs * batches.steps_per_epoch))
    model.to(device)

    group = processes()

    def step_loss(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        everyone = batches(step)
        rows = group.share(everyone)
        batch = labelled_batch(tokenizer, [texts[i] for i in rows], labels[rows], max_length)
        batch = language_batch(model, tokenizer, batch, config.mlm_probability, seed, step * len(texts) + rows)
        batch = batch.to(device)
        mlm_loss = group.mean(per_sample_lm_loss(model, batch), everyone)
        task_loss = group.mean(per_sample_task_loss(model, batch), everyone)
        return mlm_loss + config.task_loss_weight * task_loss, {"mlm": mlm_loss.item(), "task": task_loss.item()}

    settings = LoopSettings(config, total_steps, description="warm-up")
    summary = train_loop(model, settings, step_loss, seed, show_progress=show_progress)
    summary["dev_accuracy"] = round(accuracy(model, tokenizer, task, "dev", max_length, device), 4)
    return summary
