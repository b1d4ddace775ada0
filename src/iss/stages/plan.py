"""The run plan: every stage a config's ``iss run`` makes, named in one place.

A run compares methods (``evaluation.methods``) at budgets (``evaluation.budgets``) over seeds (pretraining and
fine-tuning, ``IssConfig.seed_pairs``). The plan lists those fine-tuning runs with the names of the stages each
rests on, so the pipeline, the estimate, the report and the benchmarks read stage names from here instead of
building or parsing them. Names are stable: they are the folders of existing run folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from iss.selection.methods import EVALUATED, SELECTION

if TYPE_CHECKING:
    from iss.config.schema import Budget, InfluenceConfig, IssConfig


def select_stage(method: str, tag: str = "") -> str:
    """The subset of evaluated method ``method`` (``iss-cosine``; its selection method plus its own tag) with the
    variant ``tag`` (a budget of a sweep, ``@12.5pct``; a layer, ``@layer1``)."""
    return f"select-{method}{tag}"


def pretrain_stage(method: str, tag: str, seed: int) -> str:
    return f"pretrain-{method}{tag}-seed{seed}"


def finetune_stage(method: str | None, tag: str, seed: int, pretrain_seed: int | None = None) -> str:
    """A fine-tuning run; ``method`` None is no pretraining. ``pretrain_seed`` is given under a ``pretrain_seeds``
    grid only: a pretraining seed other than the fine-tuning seed is then named, one equal to it keeps the plain
    name (as do the one-to-one pairs of ``repeat_pretraining``, whose pretraining seed follows from the config)."""
    if method is None:
        return f"finetune-none-seed{seed}"
    pretrained = "" if pretrain_seed is None or pretrain_seed == seed else f"-pretrain{pretrain_seed}"
    return f"finetune-{method}{tag}{pretrained}-seed{seed}"


def mechanism_stage(method: str | None, tag: str = "", repeat: int = 0) -> str:
    name = "mechanism-none" if method is None else f"mechanism-{method}{tag}"
    return name + (f"-repeat{repeat}" if repeat else "")


def evaluate_stage(method: str, tag: str = "") -> str:
    return f"evaluate-{method}{tag}"


def influence_stage(settings: InfluenceConfig) -> str:
    """Influence of the last block per document is ``influence``; other layers (layer ablation), similarities
    and mini-batch matchings live beside it under names of their own."""
    name = "influence" if settings.layer == "last" else f"influence-layer{settings.layer}"
    if settings.pool_batch > 1 or settings.task_batch > 1:
        name += f"-bp{settings.pool_batch}-bt{settings.task_batch}"
        name += "-random" if settings.pool_batch > 1 and settings.pool_grouping == "random" else ""
    return name if settings.similarity == "dot" else f"{name}-{settings.similarity}"


@dataclass(frozen=True)
class PlannedRun:
    """One fine-tuning run of the plan and the stages it rests on."""

    method: str  # an evaluated method (iss.methods.EVALUATED)
    seed: int  # fine-tuning seed
    pretrain_seed: int | None  # None: no pretraining (method "none")
    budget: Budget | None = None  # a budget of the sweep; None: selection.budget (or no pretraining)
    tag: str = ""  # the budget's tag in stage names when the run sweeps budgets
    grid: bool = False  # pretraining seeds x fine-tuning seeds (evaluation.pretrain_seeds): names say both

    @property
    def pretrained(self) -> bool:
        return self.pretrain_seed is not None

    @property
    def select(self) -> str | None:
        return select_stage(self.method, self.tag) if self.pretrained else None

    @property
    def pretrain(self) -> str | None:
        return pretrain_stage(self.method, self.tag, self.pretrain_seed) if self.pretrain_seed is not None else None

    @property
    def finetune(self) -> str:
        pretrain_seed = self.pretrain_seed if self.grid else None
        return finetune_stage(self.method if self.pretrained else None, self.tag, self.seed, pretrain_seed)


@dataclass(frozen=True)
class RunPlan:
    """The fine-tuning runs of ``iss run`` for one config, in the order it makes them."""

    config: IssConfig

    @cached_property
    def runs(self) -> list[PlannedRun]:
        config = self.config
        sweep = config.evaluation.budgets
        runs = []
        for name in config.evaluation.methods:
            if EVALUATED[name].selection is None:
                runs += [PlannedRun(name, seed, None) for seed in config.finetune.seeds]
                continue
            for budget in sweep or [None]:
                tag = budget.tag if budget is not None else ""
                grid = config.evaluation.pretrain_seeds is not None
                runs += [PlannedRun(name, seed, p, budget, tag, grid) for p, seed in config.seed_pairs()]
        return runs

    def subsets(self) -> list[PlannedRun]:
        """One run per selected subset (method and budget): where to read each subset's stage."""
        return list({run.select: run for run in self.runs if run.pretrained}.values())

    def pretrainings(self) -> list[str]:
        """Every pretraining stage, once."""
        return list(dict.fromkeys(run.pretrain for run in self.runs if run.pretrain))

    def influence_settings(self) -> list[InfluenceConfig]:
        """The influence settings of each influence stage the plan's ISS methods read (cosine and Table A.1
        batching score apart; methods that share a stage share its settings)."""
        settings = {}
        for method in dict.fromkeys(run.method for run in self.runs if run.pretrained):
            evaluated = EVALUATED[method]
            if SELECTION[evaluated.selection].needs_influence:
                influence = self.config.with_overrides(evaluated.overrides).influence
                settings.setdefault(influence_stage(influence), influence)
        return list(settings.values())

    def influence_stages(self) -> list[str]:
        return [influence_stage(settings) for settings in self.influence_settings()]

    def subset_of(self, pretrain: str) -> PlannedRun:
        """A run of the plan that pretrains with this stage: its method, variant tag and select stage."""
        return next(run for run in self.runs if run.pretrain == pretrain)

    def stages_by_kind(self) -> dict[str, list[str]]:
        """Every stage the plan makes, by the kind of work the estimate prices it as."""
        repeats = self.config.evaluation.mechanism_repeats
        checks = []
        if self.config.evaluation.mechanism_steps:
            checks = [mechanism_stage(r.method, r.tag, repeat) for r in self.subsets() for repeat in range(repeats)]
            checks.append(mechanism_stage(None))
        return {
            "data, tokenizer, retrieval": ["data", "tokenizer", "retrieval"],
            "selection": [run.select for run in self.subsets()],
            "MLM head fit": ["mlm-head"] if self.config.model.mlm_head_steps else [],
            "warm-up": ["warmup"] if self.influence_stages() or checks else [],
            "influence": self.influence_stages(),
            "pretraining": self.pretrainings(),
            "fine-tuning": [run.finetune for run in self.runs],
            "mechanism check": checks,
        }
