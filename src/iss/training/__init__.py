"""Training a model: one resumable loop (:mod:`~iss.training.loop`), the warm-up on the task
(:mod:`~iss.training.warmup`), pretraining on a subset with TLM's joint objective
(:mod:`~iss.training.pretraining`) and fine-tuning with its scores (:mod:`~iss.training.finetuning`).
"""

from iss.training.finetuning import accuracy, pooled_features, task_logits
from iss.training.loop import (
    LoopSettings,
    StepLoss,
    TrainingBatches,
    bucketed_batches,
    encoded_lengths,
    epoch_order,
    epoch_rows,
    stream_tokens,
    train_loop,
)
from iss.training.pretraining import pretrain, task_batch_schedule, unigram_entropy
from iss.training.warmup import warmup_train

__all__ = [
    "LoopSettings",
    "StepLoss",
    "TrainingBatches",
    "accuracy",
    "bucketed_batches",
    "encoded_lengths",
    "epoch_order",
    "epoch_rows",
    "pooled_features",
    "pretrain",
    "stream_tokens",
    "task_batch_schedule",
    "task_logits",
    "train_loop",
    "unigram_entropy",
    "warmup_train",
]
