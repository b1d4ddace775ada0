"""The verdict a run exists for: does a selector's subset beat the others, behind a positive control?

Per task, first the **positive control**: TLM (the BM25 pool) against a random sample of the whole corpus. The
regime can see data only if in-domain text beats out-of-domain text, so the control *passes* when its whole 95 %
t-interval lies above ``evaluation.control_margin`` (default +1 F1 point). Only then is the **family** read (ISS -
TLM, ISS - random from the pool, ISS - ISS bottom, DSIR - TLM, ...): paired Student-t intervals over pretraining
seeds (:mod:`iss.stats`), two-sided p-values, and Holm's step-down adjustment across the family, so that reading
six comparisons does not buy six chances of a false "better". Each comparison is then ``better``, ``worse`` or
``tie``; where the control failed, every comparison is ``not read``.

The adjusted interval of the comparison ranked r-th by p-value is the t-interval at level 1 - alpha / (m - r + 1),
Holm's level for that step, while every earlier step rejected; from the first step that does not reject on, the
remaining intervals use that step's level. So an adjusted interval excludes zero exactly when Holm rejects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from iss.comparison.stats import no_spread, paired_units, sample_std, seed_unit, t_interval, unit_means
from iss.config.schema import CONTROL, DEFAULT_FAMILY
from iss.config.schema import parse_comparison as parse_comparison  # the grammar of evaluation.comparisons

NOT_READ = "not read: the control did not pass"


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (as statsmodels' ``multipletests(method='holm')``), in input order."""
    p = np.asarray(p_values, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def seeds_for_power(
    effect: float, sd: float, margin: float = 1.0, level: float = 0.95, power: float = 0.8, most: int = 1000
) -> int | None:
    """Fewest paired units (pretraining seeds) that clear ``margin`` with probability ``power``.

    "Clear" means the two-sided ``level`` t-interval's lower end is above the margin, i.e. the one-sided t-test
    of mean <= margin rejects at (1 - level) / 2; its power under a true mean ``effect`` and spread ``sd`` is the
    noncentral t's tail. None when ``effect`` is not above the margin or more than ``most`` units are needed.
    """
    if effect <= margin:
        return None
    if sd <= 0:
        return 2  # no spread: two units already clear it
    for n in range(2, most + 1):
        critical = stats.t.ppf(1 - (1 - level) / 2, n - 1)
        if stats.nct.sf(critical, n - 1, (effect - margin) * math.sqrt(n) / sd) >= power:
            return n
    return None


@dataclass(frozen=True)
class Comparison:
    """One paired comparison of two methods over the pretraining seeds both ran (F1 x 100)."""

    first: str
    second: str
    units: list[int]
    differences: list[float]  # first - second per unit, in ``units`` order
    mean: float
    std: float  # ddof = 1
    p_value: float  # two-sided, H0: mean difference 0 (the control: H0 mean <= margin, one-sided)
    level: float  # of the interval below (Holm's step level inside a family)
    low: float
    high: float
    verdict: str
    p_adjusted: float | None = None

    @property
    def name(self) -> str:
        return f"{self.first} - {self.second}"

    def row(self) -> dict:
        """A display row: the comparison, its mean [interval] at its level, p-values and verdict."""
        row = {
            "comparison": self.name,
            "seeds": len(self.units),
            "mean": round(self.mean, 2),
            "interval": f"[{self.low:.2f}, {self.high:.2f}]" if not math.isnan(self.low) else "n/a",
            "level": f"{self.level:.4g}",
            "p": f"{self.p_value:.3g}",
        }
        if self.p_adjusted is not None:
            row["p (Holm)"] = f"{self.p_adjusted:.3g}"
        return {**row, "verdict": self.verdict}


def _p_value(differences: np.ndarray, null: float = 0.0, alternative: str = "two-sided") -> float:
    if differences.size < 2:
        return float("nan")
    if no_spread(differences):
        mean = float(differences.mean())
        above = mean > null if alternative == "greater" else mean != null
        return 0.0 if above else 1.0
    return float(stats.ttest_1samp(differences, null, alternative=alternative).pvalue)


@dataclass(frozen=True)
class TaskVerdict:
    """The control and the family's comparisons of one task (and budget)."""

    task: str
    margin: float
    level: float
    control: Comparison | None  # None: the run has no TLM and random-corpus pair
    comparisons: list[Comparison]

    @property
    def control_passed(self) -> bool:
        return self.control is not None and self.control.verdict == "passed"

    def rows(self) -> list[dict]:
        return [{"task": self.task, **c.row()} for c in ([self.control] if self.control else []) + self.comparisons]

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "margin": self.margin,
            "level": self.level,
            "control_passed": self.control_passed,
            "control": asdict(self.control) if self.control else None,
            "comparisons": [asdict(c) for c in self.comparisons],
        }

    @classmethod
    def from_json(cls, data: dict) -> TaskVerdict:
        """The verdict as :meth:`to_json` wrote it (results.json, evidence.json)."""
        control = Comparison(**data["control"]) if data["control"] else None
        comparisons = [Comparison(**row) for row in data["comparisons"]]
        return cls(data["task"], data["margin"], data["level"], control, comparisons)

    def sentence(self) -> str:
        """One line a reader can act on: the control, then each comparison's verdict."""
        if self.control is None:
            return f"{self.task}: no positive control (needs tlm and random-corpus): nothing read"
        control = self.control
        head = (
            f"{self.task}: control TLM - random corpus {control.mean:+.2f} [{control.low:.2f}, {control.high:.2f}] "
            f"{'passed' if self.control_passed else 'not passed'} (> +{self.margin:g})"
        )
        if not self.control_passed:
            return f"{head}; comparisons not read" if self.comparisons else head
        parts = [f"{c.name} {c.mean:+.2f} [{c.low:.2f}, {c.high:.2f}] {c.verdict}" for c in self.comparisons]
        return "; ".join([head, *parts])


def task_verdict(
    scores: dict[str, dict[int, list[float]]],
    task: str = "",
    margin: float = 1.0,
    family: Sequence[tuple[str, str]] = DEFAULT_FAMILY,
    level: float = 0.95,
) -> TaskVerdict:
    """The verdict of one task from ``scores`` (method -> pretraining seed -> its fine-tuning scores, F1 x 100).

    Comparisons whose two methods did not both run are left out of the family (and of Holm's m).
    """
    means = {method: unit_means(by_unit) for method, by_unit in scores.items()}
    control = None
    if all(method in means for method in CONTROL):
        units, diffs = paired_units(means[CONTROL[0]], means[CONTROL[1]])
        low, high = t_interval(diffs, level)
        passed = not math.isnan(low) and low > margin
        control = Comparison(
            *CONTROL,
            units,
            diffs.tolist(),
            float(diffs.mean()) if diffs.size else float("nan"),
            sample_std(diffs.tolist()),
            _p_value(diffs, margin, "greater"),
            level,
            low,
            high,
            "passed" if passed else "not passed",
        )
    pairs = [(a, b) for a, b in family if a in means and b in means and paired_units(means[a], means[b])[0]]
    paired = [paired_units(means[a], means[b]) for a, b in pairs]
    p_values = [_p_value(diffs) for _, diffs in paired]
    usable = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    adjusted = dict(zip(usable, holm([p_values[i] for i in usable]), strict=True)) if usable else {}
    alpha, m = 1 - level, len(usable)
    step_level, stopped = {}, None
    for rank, index in enumerate(sorted(usable, key=lambda i: p_values[i])):
        holm_level = 1 - alpha / (m - rank) if stopped is None else stopped
        if stopped is None and p_values[index] > alpha / (m - rank):
            stopped = holm_level
        step_level[index] = holm_level
    comparisons = []
    for i, ((first, second), (units, diffs)) in enumerate(zip(pairs, paired, strict=True)):
        this_level = step_level.get(i, level)
        low, high = t_interval(diffs, this_level)
        if control is None or control.verdict != "passed":
            verdict = NOT_READ if control is not None else "not read: no positive control"
        elif i not in adjusted:
            verdict = "n/a"
        elif adjusted[i] < alpha:
            verdict = "better" if diffs.mean() > 0 else "worse"
        else:
            verdict = "tie"
        comparisons.append(
            Comparison(
                first,
                second,
                units,
                diffs.tolist(),
                float(diffs.mean()),
                sample_std(diffs.tolist()),
                p_values[i],
                this_level,
                low,
                high,
                verdict,
                adjusted.get(i),
            )
        )
    return TaskVerdict(task, margin, level, control, comparisons)


def run_scores(runs: list[dict]) -> dict[tuple[str, str], dict[str, dict[int, list[float]]]]:
    """(task, budget) -> method -> pretraining seed -> test F1 x 100 of its fine-tuning runs, from result rows
    (``results.json``'s ``runs``: method, task, budget, seed, pretrain_seed, test)."""
    grouped: dict[tuple[str, str], dict[str, dict[int, list[float]]]] = {}
    for row in runs:
        unit = seed_unit(row)
        key = (row.get("task", ""), row.get("budget", ""))
        grouped.setdefault(key, {}).setdefault(row["method"], {}).setdefault(unit, []).append(100 * row["test"])
    return grouped


def verdicts(
    runs: list[dict],
    margin: float = 1.0,
    family: Sequence[tuple[str, str]] = DEFAULT_FAMILY,
    level: float = 0.95,
) -> list[TaskVerdict]:
    """One verdict per task (and budget of a sweep) of a run's result rows."""
    return [
        task_verdict(scores, f"{task} ({budget})" if budget else task, margin, family, level)
        for (task, budget), scores in run_scores(runs).items()
    ]
