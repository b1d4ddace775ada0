"""The one training loop (warm-up, pretraining and fine-tuning run through it) and its batch orders.

Every micro-batch is a pure function of (seed, step, micro-batch index), so a run resumed from a checkpoint sees
exactly the batches and masks an uninterrupted run would; checkpoints hold the weights (safetensors) plus
optimizer, schedule and RNG state, written to a temporary folder and renamed.
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

from iss.config.schema import OptimizerConfig
from iss.modeling.batches import (
    token_counts,
)
from iss.modeling.model import TaskModel
from iss.modeling.precision import forward_autocast
from iss.runs.processes import processes

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


def encoded_lengths(tokenizer: PreTrainedTokenizerFast, texts: list[str], max_length: int) -> np.ndarray:
    """Tokens per text as :func:`iss.model.encode` feeds it (special tokens included, truncated)."""
    return np.asarray(tokenizer(texts, truncation=True, max_length=max_length, return_length=True)["length"])
