"""Training on a selected subset and reading the result: pretrain (from scratch with TLM's joint objective, or
further pretraining), fine-tune once per seed and score dev/test, and evaluate (mean and std over seeds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from iss.comparison.stats import sample_std
from iss.config.schema import fingerprint_dump
from iss.modeling.frozen import FrozenStates
from iss.modeling.model import TaskModel, set_trainable
from iss.runs.folder import StageResult
from iss.selection.subset import read_subset_texts
from iss.stages.context import StageContext
from iss.stages.inputs import data, read_tokenizer, task, tokenizer
from iss.stages.plan import evaluate_stage, finetune_stage, pretrain_stage
from iss.stages.price import FORWARD_SHARE, Price, Workload
from iss.stages.select import select
from iss.stages.warmup import initial_model, start_parts
from iss.training.finetuning import finetune as finetune_model
from iss.training.pretraining import pretrain as pretrain_model
from iss.training.pretraining import task_batch_schedule, unigram_entropy


def pretrain(context: StageContext, seed: int | None = None) -> StageResult:
    """Pretrain on the configured method's subset: from scratch (TLM's joint objective) or further."""
    config = context.config
    seed = config.seed if seed is None else seed
    selected, tokenizer_stage, data_stage = select(context), tokenizer(context), data(context)
    name = pretrain_stage(config.selection.method, context.tag, seed)

    def body(folder: Path, summary: dict) -> None:
        task_data = task(context)
        run_tokenizer = read_tokenizer(context, tokenizer_stage.path)
        subset = read_subset_texts(selected.path)
        model = initial_model(context, task_data, run_tokenizer, seed)
        set_trainable(model, config.model.freeze_embeddings, config.pretrain.trainable_blocks)
        checkpoint = context.run.work_dir(name) / "checkpoint"
        summary.update(
            pretrain_model(
                model, run_tokenizer, subset, task_data, config.pretrain, config.model.max_length, seed,
                context.device, checkpoint, context.show_progress,
            )
        )  # fmt: skip
        parameters = sum(p.numel() for p in model.lm.parameters())
        summary.update({"subset_docs": len(subset), "parameters": parameters})
        summary["unigram_mlm_level"] = round(unigram_entropy(run_tokenizer, subset), 4)  # the curve must beat it
        summary["flops"] = 6 * summary["tokens"] * parameters
        model.save(folder / "model")

    parts = {
        "pretrain": fingerprint_dump(config.pretrain),
        "model": fingerprint_dump(config.model),
        "precision": config.precision,
        "seed": seed,
        "selection": selected.fingerprint,
        "tokenizer": tokenizer_stage.fingerprint,
        "data": data_stage.fingerprint,
        **start_parts(context),
    }
    return context.stage(name, parts, body, data_parallel=True)


def finetune(
    context: StageContext, seed: int | None = None, pretrained: bool = True, pretrain_seed: int | None = None
) -> StageResult:
    """Fine-tune the pretrained model (or, with ``pretrained=False``, a fresh one) and score dev/test.

    The model was pretrained with ``pretrain_seed``: by default the fine-tuning seed's pair in
    :meth:`IssConfig.seed_pairs` (the same seed, or the config's seed when ``evaluation.repeat_pretraining``
    is off). A pretraining seed other than the fine-tuning seed is named in the stage.
    """
    config = context.config
    seed = config.seed if seed is None else seed
    if pretrain_seed is None:
        fallback = seed if config.evaluation.repeat_pretraining else config.seed
        pretrain_seed = next((p for p, f in config.seed_pairs() if f == seed), fallback)
    tokenizer_stage, data_stage = tokenizer(context), data(context)
    upstream = pretrain(context, pretrain_seed) if pretrained else None
    grid = config.evaluation.pretrain_seeds is not None
    name = finetune_stage(
        config.selection.method if pretrained else None, context.tag, seed, pretrain_seed if grid else None
    )

    def body(folder: Path, summary: dict) -> None:
        task_data = task(context)
        run_tokenizer = read_tokenizer(context, tokenizer_stage.path)
        if upstream is None:
            model = initial_model(context, task_data, run_tokenizer, seed)
        else:
            model = TaskModel.load(upstream.path / "model", num_labels=len(task_data.labels))
        set_trainable(model, config.model.freeze_embeddings, config.finetune.trainable_blocks)
        result = finetune_model(
            model, run_tokenizer, task_data, config.finetune, config.task.metric, config.model.max_length, seed,
            context.device, context.show_progress, context.frozen_states,
        )  # fmt: skip
        (folder / "scores.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        summary.update({k: result[k] for k in ("seed", "metric", "best_epoch", "dev", "test")})

    parts = {
        "finetune": fingerprint_dump(config.finetune, exclude={"seeds"}),  # one seed per stage
        "precision": config.precision,
        "metric": config.task.metric,
        "seed": seed,
        "upstream": upstream.fingerprint if upstream else fingerprint_dump(config.model) | start_parts(context),
        "tokenizer": tokenizer_stage.fingerprint,
        "data": data_stage.fingerprint,
    }
    return context.stage(name, parts, body, data_parallel=True)


def evaluate(context: StageContext) -> StageResult:
    """Fine-tune the configured method's pretrained model once per seed; mean and std of dev/test F1."""
    config = context.config
    method = config.selection.method
    runs = [finetune(context, seed, pretrain_seed=pretrain_seed) for pretrain_seed, seed in config.seed_pairs()]

    def body(folder: Path, summary: dict) -> None:
        scores = {split: [run.summary[split] for run in runs] for split in ("dev", "test")}
        summary.update({"method": method, "metric": config.task.metric, "seed_pairs": config.seed_pairs()})
        for split, values in scores.items():
            summary[f"{split}_mean"], summary[f"{split}_std"] = float(np.mean(values)), sample_std(values)
        (folder / "scores.json").write_text(json.dumps({**summary, **scores}, indent=2), encoding="utf-8")

    return context.stage(evaluate_stage(method, context.tag), {"runs": [run.fingerprint for run in runs]}, body)


def pretrain_price(work: Workload) -> Price:
    """Every pretraining of the plan: its steps' task batches (TLM's joint objective) and corpus batches."""
    pretrain = work.config.pretrain
    schedule = task_batch_schedule(pretrain.steps * pretrain.accumulation, pretrain.rho1, pretrain.objective)
    tokens = schedule.sum() * work.task_batch + (~schedule).sum() * work.subset_batch
    runs = len(work.plan.pretrainings())
    return Price("pretraining", runs, {"pretraining": runs * tokens})


def finetune_price(work: Workload) -> Price:
    """Every fine-tuning of the plan: its epochs over the training split and a dev pass per epoch and one test
    pass, plus (with cached frozen blocks) the frozen blocks' encodings of every split."""
    config, tokens = work.config, work.split_tokens
    finetune_settings = config.finetune
    epoch = work.epoch_tokens(finetune_settings.batch_size, finetune_settings.length_buckets)
    evaluation = (finetune_settings.epochs * tokens["dev"] + tokens["test"]) * FORWARD_SHARE
    runs = len(work.plan.runs)
    price = {"task": runs * (finetune_settings.epochs * epoch + evaluation)}
    if finetune_settings.cache_frozen_blocks:  # one forward pass of the whole model over every split first
        cache_pass = (int(work.train_lengths.sum()) + tokens["dev"] + tokens["test"]) * FORWARD_SHARE
        price["joint"] = frozen_encodings(work) * cache_pass
    return Price("fine-tuning", runs, price)


def frozen_encodings(work: Workload) -> float:
    """How many whole encodings of the task by the frozen lower blocks fine-tuning makes (see
    :class:`iss.frozen.FrozenStates`): one per pretrained model, one for the checkpoint's seeds without
    pretraining (one per seed from scratch, where each seed's model differs); where pretraining leaves the blocks
    below its top ones untouched, those are encoded once and each model adds only its frozen blocks above them."""
    config, plan = work.config, work.plan
    if not config.finetune.cache_frozen_blocks:
        return 0.0
    fresh = [run for run in plan.runs if not run.pretrained]
    models = len(plan.pretrainings()) + (min(len(fresh), 1) if config.model.path else len(fresh))
    frozen = work.blocks - config.finetune.trainable_blocks
    untouched = FrozenStates.for_config(config).untouched_depth(work.blocks, frozen)
    if untouched is not None:
        return untouched / frozen + models * (frozen - untouched) / frozen
    return float(models)
