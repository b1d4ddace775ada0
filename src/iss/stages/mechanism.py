"""The mechanism check: does a subset's MLM gradient lower the warmed-up model's task loss, as influence
predicts? The warmed-up model continues on the subset with MLM only, then its task head is scored."""

from __future__ import annotations

from pathlib import Path

from iss.config.schema import fingerprint_dump
from iss.modeling.model import TaskModel, set_trainable
from iss.runs.folder import StageResult
from iss.selection.subset import read_subset_texts
from iss.stages.context import StageContext
from iss.stages.inputs import read_tokenizer, task, tokenizer
from iss.stages.plan import mechanism_stage
from iss.stages.price import FORWARD_SHARE, Price, Workload
from iss.stages.select import select
from iss.stages.warmup import warmup
from iss.training.finetuning import head_scores
from iss.training.pretraining import pretrain as pretrain_model


def mechanism(context: StageContext, pretrained: bool = True, repeat: int = 0) -> StageResult:
    """Continue the warmed-up model on the subset with MLM only for ``evaluation.mechanism_steps`` steps, then
    score its task head on dev and test (no fine-tuning).

    With ``pretrained=False`` the warmed-up model is scored as it is (the reference point). Repeat ``r`` draws
    the steps' batches and masks with seed + r (``evaluation.mechanism_repeats``); repeat 0 is the single check.
    """
    config = context.config
    warmed_up, tokenizer_stage = warmup(context), tokenizer(context)
    selected = select(context) if pretrained else None
    steps = config.evaluation.mechanism_steps
    name = mechanism_stage(config.selection.method if pretrained else None, context.tag, repeat)

    def body(folder: Path, summary: dict) -> None:
        task_data = task(context)
        run_tokenizer = read_tokenizer(context, tokenizer_stage.path)
        model = TaskModel.load(warmed_up.path / "model", num_labels=len(task_data.labels))
        if selected is not None:
            subset = read_subset_texts(selected.path)
            set_trainable(model, config.model.freeze_embeddings)
            settings = config.pretrain.model_copy(update={"steps": steps, "objective": "mlm", "save_every": 0})
            trained = pretrain_model(
                model, run_tokenizer, subset, task_data, settings, config.model.max_length, config.seed + repeat,
                context.device, show_progress=context.show_progress,
            )  # fmt: skip
            summary.update({"steps": steps, "mlm": trained.get("mlm")})
        for split in ("dev", "test"):
            scores = head_scores(
                model, run_tokenizer, task_data, split, config.task.metric, config.model.max_length, context.device
            )
            summary.update({f"{split}_{key}": round(value, 5) for key, value in scores.items()})

    parts = {
        "steps": steps,
        "precision": config.precision,
        "pretrain": fingerprint_dump(config.pretrain),
        "warmup": warmed_up.fingerprint,
        "selection": selected.fingerprint if selected else None,
        "metric": config.task.metric,
        **({"repeat": repeat} if repeat else {}),  # repeat 0 keeps the single check's fingerprint
    }
    return context.stage(name, parts, body, data_parallel=True)


def mechanism_checks(context: StageContext, pretrained: bool = True) -> list[StageResult]:
    """Every repeat of the mechanism check (one for the warmed-up model alone: it has nothing to draw)."""
    repeats = context.config.evaluation.mechanism_repeats if pretrained else 1
    return [mechanism(context, pretrained, repeat) for repeat in range(repeats)]


def mechanism_rows(context: StageContext, pretrained: bool = True) -> list[dict]:
    """One table row per mechanism check: its summary (less the timing), tagged with its repeat when the check
    is repeated (the tables pair repeats by that tag; a single check's rows stay as they were)."""
    repeated = context.config.evaluation.mechanism_repeats > 1
    return [
        {**({"repeat": repeat} if repeated else {}), **{k: v for k, v in check.summary.items() if k != "seconds"}}
        for repeat, check in enumerate(mechanism_checks(context, pretrained))
    ]


def price(work: Workload) -> Price:
    """Each subset's checks (MLM steps on corpus batches, then a dev and test pass) and the warmed-up model's."""
    evaluation, tokens = work.config.evaluation, work.split_tokens
    if not evaluation.mechanism_steps:
        return Price("mechanism check", 0, {"joint": 0.0})
    checks = len(work.plan.subsets()) * evaluation.mechanism_repeats  # + one of the warmed-up model alone
    cost = (
        checks * evaluation.mechanism_steps * work.subset_batch
        + (checks + 1) * (tokens["dev"] + tokens["test"]) * FORWARD_SHARE
    )
    return Price("mechanism check", checks + 1, {"joint": cost})
