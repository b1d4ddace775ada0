"""Training: the warm-up (Algorithm 1, line 2) and pretraining on a selected subset (TLM's joint objective).

Both run through one loop whose every micro-batch is a pure function of (seed, step, micro-batch index), so a
run resumed from a checkpoint sees exactly the batches and masks an uninterrupted run would; checkpoints hold
the weights (safetensors) plus optimizer, schedule and RNG state, written to a temporary folder and renamed.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, get_linear_schedule_with_warmup

from iss.config import OptimizerConfig, PretrainConfig, WarmupConfig
from iss.data import TaskData
from iss.errors import DataError
from iss.model import (
    PackedDocuments,
    TaskModel,
    encode,
    forward_autocast,
    labelled_batch,
    language_batch,
    length_sorted,
    per_sample_lm_loss,
    per_sample_task_loss,
    token_counts,
)
from iss.parallel import processes

log = logging.getLogger("iss")

StepLoss = Callable[[int, int], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class LoopSettings:
    """One training loop: the optimiser section of its config, its length and checkpointing."""

    optimizer: OptimizerConfig
    total_steps: int
    accumulation: int = 1
    save_every: int = 0  # steps between checkpoints; 0 = none
    description: str = "train"
    curve_every: int = 0  # steps between points of the smoothed loss curve (and the last step); 0 = no curve


def train_loop(
    model: TaskModel,
    settings: LoopSettings,
    step_loss: StepLoss,
    seed: int,
    checkpoint_dir: Path | None = None,
    show_progress: bool = True,
    after_step: Callable[[int], None] | None = None,
) -> dict:
    """AdamW with linear warm-up/decay over ``step_loss(step, micro)``; returns smoothed final losses.

    With ``checkpoint_dir`` the state is saved every ``save_every`` steps and loaded on start if present.
    ``after_step(step)`` runs after each optimizer step (evaluation); the model is back in train mode after it.
    With ``settings.curve_every`` the summary holds the smoothed loss curve, kept in the checkpoint so that a
    resumed run reports the whole curve. Frozen parameters (``requires_grad`` off) are left out.
    Under several processes (:mod:`iss.parallel`) ``step_loss`` returns this process's share of the loss; the
    gradients and logged parts are summed across processes, and only the main process writes checkpoints.
    """
    group = processes()
    torch.manual_seed(seed)
    model.train()
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.optimizer.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.optimizer.learning_rate,
    )
    total = settings.total_steps
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.optimizer.warmup_ratio * total), total)
    step, running, curve = 0, {}, []
    resume = _checkpoint_to_resume(checkpoint_dir) if checkpoint_dir is not None else None
    if resume is not None:
        step, running, curve = _load_checkpoint(resume, model, optimizer, scheduler)
    bar = tqdm(total=total, initial=step, desc=settings.description, disable=not show_progress, unit="step")
    while step < total:
        optimizer.zero_grad(set_to_none=True)
        for micro in range(settings.accumulation):
            with forward_autocast(device):
                loss, parts = step_loss(step, micro)
            (loss / settings.accumulation).backward()
            for name, value in group.sum_values(parts).items():
                running[name] = _smooth(running.get(name, math.nan), value)
        group.sum_gradients(trainable)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        bar.set_postfix({name: f"{value:.3f}" for name, value in running.items()})
        bar.update()
        if settings.curve_every and (step % settings.curve_every == 0 or step == total):
            curve.append({"step": step, **{name: round(value, 4) for name, value in running.items()}})
        if after_step is not None:
            after_step(step)
            model.train()
        due = settings.save_every and (step % settings.save_every == 0 or step == total)
        if checkpoint_dir is not None and due and group.is_main:
            _save_checkpoint(checkpoint_dir, model, optimizer, scheduler, step, running, curve)
    bar.close()
    model.eval()
    summary: dict = {"steps": total, **{name: round(value, 4) for name, value in running.items()}}
    return summary | ({"curve": curve} if settings.curve_every else {})


def _save_checkpoint(
    folder: Path, model, optimizer, scheduler, step: int, running: dict[str, float], curve: list[dict]
) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors")
    )
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "running": running,
        "curve": curve,
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, tmp / "state.pt")
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _checkpoint_to_resume(folder: Path) -> Path | None:
    """The checkpoint folder, or the previous one if a kill fell between the two renames of a save."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / "state.pt").is_file():
            return candidate
    return None


def _load_checkpoint(folder: Path, model, optimizer, scheduler) -> tuple[int, dict[str, float], list[dict]]:
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    state = torch.load(folder / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    log.info("%s: resuming at step %d", folder.parent.name, int(state["step"]))
    return int(state["step"]), dict(state["running"]), list(state.get("curve", []))


def _smooth(previous: float, value: float, weight: float = 0.9) -> float:
    return value if math.isnan(previous) else weight * previous + (1 - weight) * value


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of 0..n-1 that epoch ``epoch`` of :func:`epoch_rows`'s stream visits rows in."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_rows(n: int, batch_size: int, seed: int, index: int) -> np.ndarray:
    """Rows of the ``index``-th batch of an endless stream of seeded per-epoch permutations of 0..n-1."""
    epoch, position = divmod(index, math.ceil(n / batch_size))
    return epoch_order(n, seed, epoch)[position * batch_size : (position + 1) * batch_size]


def stream_tokens(lengths: np.ndarray, batch_size: int, seed: int, batches: int) -> int:
    """Tokens in the first ``batches`` batches of :func:`epoch_rows`'s stream over rows of these ``lengths``:
    each whole epoch holds every row once, so only the last, partial epoch needs its permutation."""
    if batches == 0:
        return 0
    epochs, rest = divmod(batches, math.ceil(len(lengths) / batch_size))
    partial = epoch_order(len(lengths), seed, epochs)[: rest * batch_size]
    return int(epochs * lengths.sum() + lengths[partial].sum())


def bucketed_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, pool: int = 50) -> list[np.ndarray]:
    """One epoch's batches of similar-length rows: a seeded permutation cut into pools of ``pool`` batches, each
    pool sorted by length and cut into batches, then the batch order shuffled. Every row once per epoch."""
    rng = np.random.default_rng([seed, epoch, 1])
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = order[start : start + batch_size * pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


class TrainingBatches:
    """Rows of training batch ``step`` over ``texts``: seeded per-epoch permutations (:func:`epoch_rows`), or with
    ``length_buckets`` batches of similar length (:func:`bucketed_batches`). Either way a pure function of (seed,
    step), so a resumed loop sees the batches an uninterrupted one would."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerFast, texts: list[str], batch_size: int, seed: int, length_buckets: bool
    ) -> None:
        self.batch_size, self.seed, self.n = batch_size, seed, len(texts)
        self.steps_per_epoch = math.ceil(len(texts) / batch_size)
        self.lengths = token_counts(tokenizer, texts) if length_buckets else None
        self._epoch: tuple[int, list[np.ndarray]] | None = None

    def __call__(self, step: int) -> np.ndarray:
        if self.lengths is None:
            return epoch_rows(self.n, self.batch_size, self.seed, step)
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, bucketed_batches(self.lengths, self.batch_size, self.seed, epoch))
        return self._epoch[1][position]


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


def encoded_lengths(tokenizer: PreTrainedTokenizerFast, texts: list[str], max_length: int) -> np.ndarray:
    """Tokens per text as :func:`iss.model.encode` feeds it (special tokens included, truncated)."""
    return np.asarray(tokenizer(texts, truncation=True, max_length=max_length, return_length=True)["length"])


def unigram_entropy(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> float:
    """Cross-entropy (nats) of the texts' own unigram distribution: the MLM loss of a model that has learned
    word frequencies and nothing else, the level a pretraining curve must fall clearly below."""
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    counts = np.bincount(np.asarray(ids, np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


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
