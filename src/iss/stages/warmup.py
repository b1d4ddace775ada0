"""The model every later stage starts from: the fitted MLM head (``mlm-head``, when the checkpoint was saved
without one) and the warm-up on the task (``warmup``: LM loss plus task loss), which influence scoring and the
mechanism check read."""

from __future__ import annotations

from pathlib import Path

import torch

from iss.config.schema import fingerprint_dump
from iss.data.task import TaskData
from iss.modeling.model import TaskModel, set_head_trainable, set_trainable
from iss.runs.folder import StageResult
from iss.stages.context import StageContext
from iss.stages.inputs import data, read_tokenizer, task, tokenizer
from iss.stages.price import FORWARD_SHARE, Price, Workload
from iss.training.pretraining import pretrain as pretrain_model
from iss.training.warmup import warmup_train

HEAD_SAMPLE_SEED_OFFSET = 7919  # a base adapted with mlm_head_blocks reads a sample of its own


def mlm_head(context: StageContext) -> StageResult | None:
    """The checkpoint with a fitted MLM head (``model.mlm_head_steps`` > 0), or None.

    all-MiniLM-L6-v2 is saved without its MLM head; a freshly initialised one sends random gradients into the
    encoder for the first steps of every method's further pretraining. Fitting it once, with the encoder
    frozen, on a random sample of the corpus (no method's subset) gives every method the same fitted start.
    The sample is the first documents of the corpus's seeded random order, which the random-corpus control
    takes its subset from too: the head has seen those documents once, the encoder has not.
    """
    config = context.config
    if not config.model.mlm_head_steps:
        return None
    tokenizer_stage = tokenizer(context)
    steps, settings = config.model.mlm_head_steps, config.pretrain

    def body(folder: Path, summary: dict) -> None:
        task_data = task(context)
        run_tokenizer = read_tokenizer(context, tokenizer_stage.path)
        torch.manual_seed(config.seed)
        model = TaskModel.load(config.model.path, len(task_data.labels), config.model.trust_remote_code, context.family)
        set_head_trainable(model, config.model.mlm_head_blocks)
        # the encoder trains on this sample only with mlm_head_blocks: then it is drawn apart from the
        # random-corpus control's sample (another seed), which would otherwise repeat it
        sample_seed = config.seed + (HEAD_SAMPLE_SEED_OFFSET if config.model.mlm_head_blocks else 0)
        sample = context.corpus_sample("docs", steps * settings.batch_size, 0.0, sample_seed)
        sample = sample.column("text").to_pylist()
        update = {"steps": steps, "objective": "mlm", "learning_rate": config.model.mlm_head_learning_rate}
        summary.update(
            pretrain_model(
                model, run_tokenizer, sample, task_data, settings.model_copy(update={**update, "save_every": 0}),
                config.model.max_length, config.seed, context.device, show_progress=context.show_progress,
            )
        )  # fmt: skip
        summary["sample_docs"] = len(sample)
        model.lm.save_pretrained(str(folder / "model"), safe_serialization=True)  # no task head: each run's own

    parts = {
        "model": fingerprint_dump(config.model),
        "pretrain": fingerprint_dump(settings, include={"batch_size", "mlm_probability", "packing", "weight_decay"}),
        "precision": config.precision,
        "seed": config.seed,
        "corpus": context.corpus_signature(),
        "tokenizer": tokenizer_stage.fingerprint,
    }
    return context.stage("mlm-head", parts, body)


def start_parts(context: StageContext) -> dict:
    """Fingerprint parts of a stage whose model starts from :func:`initial_model`: the fitted head, if any."""
    head = mlm_head(context)
    return {"mlm_head": head.fingerprint} if head else {}


def initial_model(
    context: StageContext, task_data: TaskData, run_tokenizer, seed: int, fitted_head: bool = True
) -> TaskModel:
    """A fresh model sized by the config (from scratch) or the local checkpoint (further pretraining), with
    its fitted MLM head when ``model.mlm_head_steps`` asks for one (unless ``fitted_head`` is off: the same
    architecture, for timing it before the fit runs); a fresh task head either way."""
    config = context.config
    torch.manual_seed(seed)
    if not config.model.path:
        return TaskModel.from_scratch(config.model, run_tokenizer, len(task_data.labels))
    context.check_tokenizer(len(run_tokenizer))  # before the head fit too
    head = mlm_head(context) if fitted_head else None
    path = head.path / "model" if head else config.model.path
    return TaskModel.load(path, len(task_data.labels), config.model.trust_remote_code, context.family)


def warmup(context: StageContext) -> StageResult:
    config = context.config
    data_stage, tokenizer_stage = data(context), tokenizer(context)

    def body(folder: Path, summary: dict) -> None:
        task_data = task(context)
        run_tokenizer = read_tokenizer(context, tokenizer_stage.path)
        model = initial_model(context, task_data, run_tokenizer, config.seed)
        set_trainable(model, config.model.freeze_embeddings, config.warmup.trainable_blocks)
        summary.update(
            warmup_train(
                model, run_tokenizer, task_data, config.warmup, config.model.max_length, config.seed,
                context.device, context.show_progress,
            )
        )  # fmt: skip
        summary["parameters"] = sum(p.numel() for p in model.parameters())
        model.save(folder / "model")

    parts = {
        "model": fingerprint_dump(config.model),
        "warmup": fingerprint_dump(config.warmup),
        "precision": config.precision,
        "seed": config.seed,
        "data": data_stage.fingerprint,
        "tokenizer": tokenizer_stage.fingerprint,
        **start_parts(context),
    }
    return context.stage("warmup", parts, body, data_parallel=True)


def head_price(work: Workload) -> Price | None:
    """The MLM-head fit: its steps of corpus batches, the encoder forward only unless the fit trains its top
    blocks too (a shared base)."""
    model = work.config.model
    head_share = 1.0 if model.mlm_head_blocks else FORWARD_SHARE
    tokens = model.mlm_head_steps * work.subset_batch * head_share
    return Price("MLM head fit", 1, {"joint": tokens}) if tokens else None


def warmup_price(work: Workload) -> Price:
    """The warm-up's epochs over the task, where anything reads the warmed-up model."""
    warmed_up = bool(work.plan.influence_stages()) or bool(work.config.evaluation.mechanism_steps)
    tokens = work.config.warmup.epochs * work.warmup_epoch if warmed_up else 0.0
    return Price("warm-up", int(warmed_up), {"warm-up": tokens})
