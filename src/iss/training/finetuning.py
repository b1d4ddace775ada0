"""Fine-tuning and evaluation: train on the task with its own loss, pick the best dev epoch, report test F1.

The paper reports micro-F1 for ChemProt and RCT and macro-F1 for the other tasks, as the mean and standard
deviation over seeds; scores come from scikit-learn so they match what other tools print.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from sklearn.metrics import f1_score
from transformers import PreTrainedTokenizerFast

from iss.config.schema import FinetuneConfig
from iss.data.task import TaskData, sample_rows
from iss.modeling.batches import encode, labelled_batch, length_sorted, per_sample_task_loss, token_counts
from iss.modeling.frozen import FrozenBlockFeatures, FrozenStates
from iss.modeling.model import TaskModel
from iss.modeling.precision import forward_autocast
from iss.runs.processes import processes
from iss.training.loop import LoopSettings, TrainingBatches, train_loop

Metric = Literal["micro_f1", "macro_f1"]


def f1(labels: np.ndarray, predictions: np.ndarray, metric: Metric) -> float:
    """Micro- or macro-averaged F1 over all label ids that occur in either array."""
    average = {"micro_f1": "micro", "macro_f1": "macro"}[metric]
    return float(f1_score(labels, predictions, average=average, zero_division=0))


def finetune(
    model: TaskModel,
    tokenizer: PreTrainedTokenizerFast,
    task: TaskData,
    config: FinetuneConfig,
    metric: Metric,
    max_length: int,
    seed: int,
    device: torch.device,
    show_progress: bool = True,
    frozen_states: FrozenStates | None = None,
) -> dict:
    """Fine-tune in place; dev is scored after every epoch, and test once, with the weights of the best dev epoch
    (the first among equals), which the model keeps.

    With ``cache_frozen_blocks``, each split's states after the frozen blocks come from ``frozen_states`` (kept
    by the caller across fine-tunings, so models with the same frozen weights encode the task once)."""
    keep = sample_rows(task.splits["train"].num_rows, config.max_train, seed)  # a low-resource run's examples
    texts, labels = [task.texts("train")[i] for i in keep], task.label_ids("train")[keep]
    batches = TrainingBatches(tokenizer, texts, config.batch_size, seed, config.length_buckets)
    model.to(device)
    epochs: list[dict] = []
    best: dict = {}
    group = processes()
    frozen = FrozenBlockFeatures(model, config.trainable_blocks) if config.cache_frozen_blocks else None
    cache = frozen_states or FrozenStates()
    states = {
        split: cache.states(frozen, tokenizer, task, split, max_length, device, config.eval_batch_size)
        for split in (("train", "dev", "test") if frozen else ())
    }

    def step_loss(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        everyone = batches(step)
        rows = group.share(everyone)
        if frozen:
            logits = frozen.logits([states["train"][keep[i]] for i in rows], device)
            targets = torch.as_tensor(labels[rows]).to(device)
            per_sample = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        else:
            batch = labelled_batch(tokenizer, [texts[i] for i in rows], labels[rows], max_length).to(device)
            per_sample = per_sample_task_loss(model, batch)
        loss = group.mean(per_sample, everyone)
        return loss, {"task": loss.item()}

    def split_f1(split: str) -> float:
        if frozen:
            logits = frozen.predict(states[split], device, config.eval_batch_size)
            return logit_scores(logits, task.label_ids(split), metric)["f1"]
        return head_scores(model, tokenizer, task, split, metric, max_length, device, config.eval_batch_size)["f1"]

    def evaluate(step: int) -> None:
        if step % batches.steps_per_epoch == 0:
            dev = split_f1("dev")
            epochs.append({"epoch": step // batches.steps_per_epoch, "dev": dev})
            if not best or dev > best["dev"]:
                trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
                best.update(epochs[-1], weights=trained)

    settings = LoopSettings(config, config.epochs * batches.steps_per_epoch, description=f"fine-tune (seed {seed})")
    summary = train_loop(model, settings, step_loss, seed, show_progress=show_progress, after_step=evaluate)
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for name, value in best["weights"].items():
            parameters[name].copy_(value)
    return {
        "seed": seed,
        "metric": metric,
        "best_epoch": best["epoch"],
        "dev": best["dev"],
        "test": split_f1("test"),
        "epochs": epochs,
        "task_loss": summary.get("task"),
    }


def head_scores(
    model: TaskModel,
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
    return logit_scores(logits, task.label_ids(split), metric)


def logit_scores(logits: torch.Tensor, label_ids: np.ndarray, metric: Metric) -> dict[str, float]:
    """Task loss (mean cross-entropy) and F1 of [rows, labels] logits against the label ids."""
    labels = torch.as_tensor(np.array(label_ids))
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    return {"task_loss": loss, "f1": f1(labels.numpy(), logits.argmax(-1).numpy(), metric)}


@torch.inference_mode()
def pooled_features(
    model: TaskModel,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    max_length: int,
    device: torch.device,
    batch_size: int = 128,
) -> torch.Tensor:
    """Pooled hidden states ([CLS] or last token) of ``texts`` in eval mode, [len(texts), hidden], on the CPU."""
    model.eval()
    features = torch.zeros(len(texts), model.lm.config.hidden_size)
    for rows in length_sorted(token_counts(tokenizer, texts), batch_size):
        batch = encode(tokenizer, [texts[i] for i in rows], max_length).to(device)
        with forward_autocast(device):
            hidden = model.pooled_hidden(batch.input_ids, batch.attention_mask)
        features[torch.from_numpy(rows)] = hidden.float().cpu()
    return features


@torch.inference_mode()
def task_logits(
    model: TaskModel,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    max_length: int,
    device: torch.device,
    batch_size: int = 128,
) -> torch.Tensor:
    """[len(texts), labels] logits of the task head in eval mode, on the CPU."""
    features = pooled_features(model, tokenizer, texts, max_length, device, batch_size)
    return model.classifier(features.to(device)).float().cpu()


def accuracy(
    model: TaskModel,
    tokenizer: PreTrainedTokenizerFast,
    task: TaskData,
    split: str,
    max_length: int,
    device: torch.device,
) -> float:
    if split not in task.splits or task.splits[split].num_rows == 0:
        return math.nan
    predicted = task_logits(model, tokenizer, task.texts(split), max_length, device).argmax(-1).numpy()
    return float((predicted == task.label_ids(split)).mean())
