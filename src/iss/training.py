"""Warm-up training (Algorithm 1, line 2): the model learns the task with MLM loss plus task loss.

The influence scores are only as good as the model they are taken at: a warmed-up model has task-aware
gradients, where a random one would rank candidates by noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, get_linear_schedule_with_warmup

from iss.config import WarmupConfig
from iss.data import TaskData
from iss.model import TaskMLMModel, encode, mask_tokens, per_sample_mlm_loss, per_sample_task_loss


def warmup_train(
    model: TaskMLMModel,
    tokenizer: PreTrainedTokenizerFast,
    task: TaskData,
    config: WarmupConfig,
    max_length: int,
    seed: int,
    device: torch.device,
    show_progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` in place on the task's train split; returns final losses and dev accuracy."""
    torch.manual_seed(seed)
    texts, labels = task.texts("train"), torch.as_tensor(task.label_ids("train").copy())
    steps_per_epoch = math.ceil(len(texts) / config.batch_size)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    rng = np.random.default_rng(seed)
    mlm_running = task_running = math.nan
    bar = tqdm(total=total_steps, desc="warm-up", disable=not show_progress, unit="step")
    step = 0
    while step < total_steps:
        order = rng.permutation(len(texts))
        for start in range(0, len(order), config.batch_size):
            if step == total_steps:
                break
            rows = order[start : start + config.batch_size]
            batch = encode(tokenizer, [texts[i] for i in rows], max_length)
            batch.labels = labels[rows]
            keys = (step * len(texts) + rows).tolist()
            batch = mask_tokens(batch, tokenizer, config.mlm_probability, seed, keys).to(device)
            mlm_loss = per_sample_mlm_loss(model, batch).mean()
            task_loss = per_sample_task_loss(model, batch).mean()
            loss = mlm_loss + config.task_loss_weight * task_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            mlm_running = _smooth(mlm_running, mlm_loss.item())
            task_running = _smooth(task_running, task_loss.item())
            bar.set_postfix(mlm=f"{mlm_running:.3f}", task=f"{task_running:.3f}")
            bar.update()
    bar.close()
    model.eval()
    return {
        "steps": total_steps,
        "mlm_loss": round(mlm_running, 4),
        "task_loss": round(task_running, 4),
        "dev_accuracy": round(accuracy(model, tokenizer, task, "dev", max_length, device), 4),
    }


def _smooth(previous: float, value: float, weight: float = 0.9) -> float:
    return value if math.isnan(previous) else weight * previous + (1 - weight) * value


@torch.no_grad()
def predict(
    model: TaskMLMModel, tokenizer: PreTrainedTokenizerFast, texts: list[str], max_length: int, device: torch.device
) -> np.ndarray:
    model.eval()
    predictions = []
    for start in range(0, len(texts), 128):
        batch = encode(tokenizer, texts[start : start + 128], max_length).to(device)
        predictions.append(model.task_logits(batch.input_ids, batch.attention_mask).argmax(-1).cpu().numpy())
    return np.concatenate(predictions) if predictions else np.zeros(0, np.int64)


def accuracy(
    model: TaskMLMModel,
    tokenizer: PreTrainedTokenizerFast,
    task: TaskData,
    split: str,
    max_length: int,
    device: torch.device,
) -> float:
    if split not in task.splits or task.splits[split].num_rows == 0:
        return math.nan
    predicted = predict(model, tokenizer, task.texts(split), max_length, device)
    return float((predicted == task.label_ids(split)).mean())
