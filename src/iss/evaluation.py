"""Fine-tuning and evaluation: train on the task with its own loss, pick the best dev epoch, report test F1.

The paper reports micro-F1 for ChemProt and RCT and macro-F1 for the other tasks, as the mean and standard
deviation over seeds; scores come from scikit-learn so they match what other tools print.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import numpy as np
import torch
from sklearn.metrics import f1_score
from transformers import PreTrainedTokenizerFast

from iss.config import FinetuneConfig
from iss.data import TaskData
from iss.model import TaskMLMModel, labelled_batch, per_sample_task_loss
from iss.training import LoopSettings, bucketed_batches, epoch_rows, task_logits, train_loop

Metric = Literal["micro_f1", "macro_f1"]


def f1(labels: np.ndarray, predictions: np.ndarray, metric: Metric) -> float:
    """Micro- or macro-averaged F1 over all label ids that occur in either array."""
    average = {"micro_f1": "micro", "macro_f1": "macro"}[metric]
    return float(f1_score(labels, predictions, average=average, zero_division=0))


def finetune(
    model: TaskMLMModel,
    tokenizer: PreTrainedTokenizerFast,
    task: TaskData,
    config: FinetuneConfig,
    metric: Metric,
    max_length: int,
    seed: int,
    device: torch.device,
    show_progress: bool = True,
) -> dict:
    """Fine-tune in place; dev and test are scored after every epoch and the best dev epoch is reported."""
    texts, labels = task.texts("train"), task.label_ids("train")
    steps_per_epoch = math.ceil(len(texts) / config.batch_size)
    model.to(device)
    epochs: list[dict] = []

    @functools.cache
    def lengths() -> np.ndarray:
        return np.asarray(tokenizer(texts, add_special_tokens=False, return_length=True)["length"])

    @functools.lru_cache(maxsize=1)
    def epoch_batches(epoch: int) -> list[np.ndarray]:
        return bucketed_batches(lengths(), config.batch_size, seed, epoch)

    def step_loss(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        if config.length_buckets:
            epoch, position = divmod(step, steps_per_epoch)
            rows = epoch_batches(epoch)[position]
        else:
            rows = epoch_rows(len(texts), config.batch_size, seed, step)
        batch = labelled_batch(tokenizer, [texts[i] for i in rows], labels[rows], max_length).to(device)
        loss = per_sample_task_loss(model, batch).mean()
        return loss, {"task": loss.item()}

    def evaluate(step: int) -> None:
        if step % steps_per_epoch == 0:
            batch = config.eval_batch_size
            scores = {
                split: head_scores(model, tokenizer, task, split, metric, max_length, device, batch)["f1"]
                for split in ("dev", "test")
            }
            epochs.append({"epoch": step // steps_per_epoch, **scores})

    settings = LoopSettings(config, config.epochs * steps_per_epoch, description=f"fine-tune (seed {seed})")
    summary = train_loop(model, settings, step_loss, seed, show_progress=show_progress, after_step=evaluate)
    best = max(epochs, key=lambda e: e["dev"])  # first epoch among equals
    return {
        "seed": seed,
        "metric": metric,
        "best_epoch": best["epoch"],
        "dev": best["dev"],
        "test": best["test"],
        "epochs": epochs,
        "task_loss": summary.get("task"),
    }


def head_scores(
    model: TaskMLMModel,
    tokenizer: PreTrainedTokenizerFast,
    task: TaskData,
    split: str,
    metric: Metric,
    max_length: int,
    device: torch.device,
    batch_size: int = 128,
) -> dict[str, float]:
    """Task loss (mean cross-entropy) and F1 of the model's task head on one split, as it stands (no training)."""
    logits = task_logits(model, tokenizer, task.texts(split), max_length, device, batch_size)
    labels = torch.as_tensor(np.array(task.label_ids(split)))
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    return {"task_loss": loss, "f1": f1(labels.numpy(), logits.argmax(-1).numpy(), metric)}
