"""The selection pipeline: one config's stages over its run folder, data -> tokenizer -> retrieval -> warm-up ->
influence -> selection -> pretraining -> fine-tuning, and the variants a run compares (methods, budgets, layers).

Each stage lives in its module under :mod:`iss.stages` (body, fingerprint parts, price); a stage reads its
upstream artifacts from disk, writes its own, and is skipped when an artifact with the same fingerprint (its
config + upstream fingerprints + input files) is already there. :class:`Pipeline` offers each stage as a method,
makes the variants, and runs them all (:meth:`Pipeline.run_all`) into the results table with its verdict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iss import stages
from iss.comparison.tables import write_results
from iss.config.schema import Budget
from iss.data.task import TaskData
from iss.modeling.model import TaskModel
from iss.runs.folder import StageResult
from iss.selection.methods import EVALUATED
from iss.selection.subset import read_subset_ids, with_overlaps
from iss.stages.context import StageContext
from iss.stages.plan import RunPlan, influence_stage


class Pipeline(StageContext):
    """Runs (or reuses) the stages of one config in its run folder."""

    def variant(self, overrides: dict, tag: str = "") -> Pipeline:
        """The same run folder under changed settings (another method, budget or layer), sharing finished
        stages; ``tag`` keeps its selection/pretrain/fine-tune artifacts apart from the default ones."""
        pipeline = Pipeline(self.config.with_overrides(overrides), self.show_progress, tag)
        pipeline.share_with(self)
        return pipeline

    def method_variant(self, name: str, budget: Budget | str | None = None, budget_tag: str = "") -> Pipeline:
        """The pipeline of one evaluated method (``iss-cosine``, ``random-corpus``, ...; see iss.methods)."""
        method = EVALUATED[name]
        overrides = dict(method.overrides)
        if method.selection is not None:
            overrides["selection.method"] = method.selection
            if budget is not None:
                overrides["selection.budget"] = budget.model_dump() if isinstance(budget, Budget) else budget
        return self.variant(overrides, method.tag + budget_tag)

    @property
    def influence_name(self) -> str:
        return influence_stage(self.config.influence)

    # ------------------------------------------------------- the stages (iss.stages), for this config

    def data(self) -> StageResult:
        return stages.inputs.data(self)

    def task(self) -> TaskData:
        return stages.inputs.task(self)

    def tokenizer(self) -> StageResult:
        return stages.inputs.tokenizer(self)

    def read_tokenizer(self, path: str | Path | None = None):
        return stages.inputs.read_tokenizer(self, path)

    def retrieval(self) -> StageResult:
        return stages.retrieval.retrieval(self)

    def pool_token_counts(self) -> np.ndarray:
        return stages.retrieval.pool_token_counts(self)

    def mlm_head(self) -> StageResult | None:
        return stages.warmup.mlm_head(self)

    def initial_model(self, task: TaskData, tokenizer, seed: int, fitted_head: bool = True) -> TaskModel:
        return stages.warmup.initial_model(self, task, tokenizer, seed, fitted_head)

    def warmup(self) -> StageResult:
        return stages.warmup.warmup(self)

    def influence(self) -> StageResult:
        return stages.influence.influence(self)

    def preflight(self, budgets: list[Budget] | None = None) -> None:
        stages.select.preflight(self, budgets)

    def select(self) -> StageResult:
        return stages.select.select(self)

    def pretrain(self, seed: int | None = None) -> StageResult:
        return stages.train.pretrain(self, seed)

    def finetune(
        self, seed: int | None = None, pretrained: bool = True, pretrain_seed: int | None = None
    ) -> StageResult:
        return stages.train.finetune(self, seed, pretrained, pretrain_seed)

    def evaluate(self) -> StageResult:
        return stages.train.evaluate(self)

    def mechanism(self, pretrained: bool = True, repeat: int = 0) -> StageResult:
        return stages.mechanism.mechanism(self, pretrained, repeat)

    def mechanism_checks(self, pretrained: bool = True) -> list[StageResult]:
        return stages.mechanism.mechanism_checks(self, pretrained)

    def mechanism_rows(self, pretrained: bool = True) -> list[dict]:
        return stages.mechanism.mechanism_rows(self, pretrained)

    # ---------------------------------------------------------------------------------------- the run

    def run_all(self) -> StageResult:
        """Select, pretrain, fine-tune and evaluate every configured method over every seed; write the tables:
        scores, paired differences with t-intervals over pretraining seeds, subset lengths and
        (``evaluation.mechanism_steps``) the mechanism check.

        With ``evaluation.budgets`` every pretrained method runs once per budget (the paper's Table 5 sweep).
        """
        config = self.config
        plan = RunPlan(config)
        budgets = config.evaluation.budgets or [config.selection.budget]
        for method in dict.fromkeys(run.method for run in plan.runs if run.pretrained):
            self.method_variant(method).preflight(budgets)
        rows, checks, subsets, subset_ids = [], [], [], []
        for run in plan.runs:
            pipeline = self.method_variant(run.method, run.budget, run.tag)
            label = {"method": run.method, "budget": str(run.budget) if run.budget else "", "task": config.task.name}
            scores = pipeline.finetune(run.seed, pretrained=run.pretrained, pretrain_seed=run.pretrain_seed)
            trained = pipeline.pretrain(run.pretrain_seed) if run.pretrained else None
            rows.append(
                {
                    **label,
                    "pretrain_seed": run.pretrain_seed,
                    "seed": run.seed,
                    "test": scores.summary["test"],
                    "dev": scores.summary["dev"],
                    "subset_docs": trained.summary["subset_docs"] if trained else 0,
                    "flops": trained.summary["flops"] if trained else 0,
                    "fingerprint": scores.fingerprint,
                }
            )
        for run in [*plan.subsets(), *[r for r in plan.runs if not r.pretrained][:1]]:
            pipeline = self.method_variant(run.method, run.budget, run.tag)
            label = {"method": run.method, "budget": str(run.budget) if run.budget else "", "task": config.task.name}
            if run.pretrained:
                selected = pipeline.select()
                top = list(selected.summary["sources"].items())[:3]
                sources = ", ".join(f"{source or '?'} {share:.0%}" for source, share in top)
                counts = {k: selected.summary[k] for k in ("docs", "tokens", "mean_tokens")}
                subsets.append({**label, **counts, "sources": sources})
                subset_ids.append(read_subset_ids(selected.path))
            if config.evaluation.mechanism_steps:
                checks += [{**label, **row} for row in pipeline.mechanism_rows(run.pretrained)]

        subsets = with_overlaps(subsets, subset_ids)

        def body(folder: Path, summary: dict) -> None:
            table = write_results(
                [{k: v for k, v in row.items() if k != "fingerprint"} for row in rows],
                folder,
                mechanism=checks,
                subsets=subsets,
                margin=config.evaluation.control_margin,
                family=config.evaluation.comparisons,
            )
            summary["average"] = {line["method"]: round(line["average"], 2) for line in table}
            summary.update({"methods": len(config.evaluation.methods), "runs": len(rows)})

        parts = {"runs": [row["fingerprint"] for row in rows], "mechanism": checks, "subsets": subsets}
        parts["intervals"] = "t over pretraining seeds"  # tables made with bootstrap intervals are made again
        # the verdict (iss.compare) is part of the table: a table from before it, or under another margin or
        # family, is made again (from the fine-tuning runs' scores alone: seconds)
        parts["verdict"] = {"margin": config.evaluation.control_margin, "family": config.evaluation.comparisons}
        return self.stage("results", parts, body)
