"""What a stage costs, as work: the padded tokens its steps and passes process, per kind of step.

Each stage module prices its own work from a :class:`Workload` (the run's inputs as measured: the task's token
counts with the run's tokenizer, the pool's, the batch shapes) and returns a :class:`Price`. :mod:`iss.estimate`
times one training step of each probe on this machine (seconds per token) and sums ``tokens x seconds per
token`` over the stages, scaled by this machine's calibration; it knows nothing else of what a stage does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from transformers import PreTrainedTokenizerFast

from iss.config.schema import IssConfig
from iss.stages.plan import RunPlan
from iss.training.loop import TrainingBatches

FORWARD_SHARE = 1 / 3  # a forward pass costs about a third of a training step (forward + backward)


@dataclass(frozen=True)
class Price:
    """The work of one kind of stage in a run: how many stages of that kind, and their padded tokens per probe
    (``joint``: MLM + task loss on the whole model, which also prices forward-only passes; ``warm-up``,
    ``pretraining``: MLM + task loss on what those stages train; ``task``: fine-tuning). A kind with no tokens
    (selections) is priced by the seconds its stages took in this machine's earlier runs."""

    kind: str
    runs: int
    tokens: dict[str, float] = field(default_factory=dict)


def padded_tokens(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    """Tokens the model processes for these batches: each batch is padded to its longest row."""
    return int(sum(len(rows) * lengths[rows].max() for rows in batches if len(rows)))


class Workload:
    """A run's inputs as the estimate measured them: what every stage's price is computed from."""

    def __init__(
        self,
        config: IssConfig,
        tokenizer: PreTrainedTokenizerFast,
        train_texts: list[str],
        train_lengths: np.ndarray,
        split_tokens: dict[str, int],
        pool_lengths: np.ndarray,
        blocks: int,
    ) -> None:
        self.config, self.plan, self.tokenizer = config, RunPlan(config), tokenizer
        self.train_texts, self.train_lengths = train_texts, train_lengths
        self.split_tokens = split_tokens  # encoded tokens of the dev and test splits (0 where a split is missing)
        self.pool_lengths = pool_lengths  # encoded lengths of the BM25 pool (a forecast before retrieval)
        self.blocks = blocks  # of the model the run trains

    def epoch_tokens(self, batch_size: int, length_buckets: bool) -> int:
        """Padded tokens of one epoch of training batches over the task's training texts."""
        batches = TrainingBatches(self.tokenizer, self.train_texts, batch_size, self.config.seed, length_buckets)
        return padded_tokens(self.train_lengths, [batches(step) for step in range(batches.steps_per_epoch)])

    @cached_property
    def warmup_epoch(self) -> int:
        warmup = self.config.warmup
        return self.epoch_tokens(warmup.batch_size, warmup.length_buckets)

    @cached_property
    def task_batch(self) -> float:
        """Padded tokens of one batch of task texts (warm-up's batching; pretraining's task batches)."""
        return self.warmup_epoch / max(1, -(-len(self.train_texts) // self.config.warmup.batch_size))

    @cached_property
    def subset_batch(self) -> float:
        """Tokens of one batch of corpus text: packed rows, or padded to the longest of ``batch_size`` random
        pool documents."""
        pretrain, max_length = self.config.pretrain, self.config.model.max_length
        if pretrain.packing:
            return pretrain.batch_size * max_length
        draws = np.random.default_rng(self.config.seed).choice(self.pool_lengths, size=(64, pretrain.batch_size))
        return pretrain.batch_size * float(draws.max(1).mean())
