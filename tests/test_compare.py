"""The verdict (iss.compare): positive control, paired t over pretraining seeds, Holm across the family."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from iss.comparison.verdict import NOT_READ, holm, parse_comparison, seeds_for_power, task_verdict, verdicts
from iss.config.schema import IssConfig


def test_holm_matches_a_hand_worked_example():
    # sorted p: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept monotone at 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # 0.5 x 2 capped at 1; 0.9 kept monotone above it


def _scores(effects: dict[str, float], seeds: int, rng: np.random.Generator, noise: float = 1.0) -> dict:
    """method -> seed -> [score]: a shared per-seed level (pretraining noise) plus each method's effect."""
    level = rng.normal(50, 2, seeds)
    return {m: {s: [level[s] + e + rng.normal(0, noise)] for s in range(seeds)} for m, e in effects.items()}


def test_a_failed_control_leaves_every_comparison_unread():
    rng = np.random.default_rng(0)
    scores = _scores({"tlm": 0.0, "random-corpus": 0.0, "iss": 5.0, "random": 0.0}, 6, rng)
    verdict = task_verdict(scores, "scierc", margin=1.0)
    assert verdict.control.verdict == "not passed" and not verdict.control_passed
    assert [c.verdict for c in verdict.comparisons] == [NOT_READ, NOT_READ]
    assert "comparisons not read" in verdict.sentence()


def test_a_passed_control_reads_the_family_with_holm_and_the_numbers_come_from_the_rows():
    rng = np.random.default_rng(1)
    effects = {"tlm": 6.0, "random-corpus": 0.0, "iss": 12.0, "iss-bottom": 6.0, "random": 6.2}
    scores = _scores(effects, 8, rng, noise=0.5)
    verdict = task_verdict(scores, "scierc", margin=1.0)
    assert verdict.control_passed
    found = {c.name: c for c in verdict.comparisons}
    assert set(found) == {"iss - tlm", "iss - random", "iss - iss-bottom"}  # pairs that ran, in family order
    assert found["iss - tlm"].verdict == "better" and found["iss - random"].verdict == "better"
    for comparison in verdict.comparisons:  # recomputed from the per-seed rows
        first, second = scores[comparison.first], scores[comparison.second]
        diffs = [np.mean(first[s]) - np.mean(second[s]) for s in sorted(first)]
        assert comparison.differences == pytest.approx(diffs)
        assert comparison.mean == pytest.approx(np.mean(diffs)) and comparison.std == pytest.approx(
            np.std(diffs, ddof=1)
        )
        assert comparison.p_value == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue)
    raw = [c.p_value for c in verdict.comparisons]
    assert [c.p_adjusted for c in verdict.comparisons] == pytest.approx(holm(raw))


def test_an_adjusted_interval_excludes_zero_exactly_when_holm_rejects():
    rng = np.random.default_rng(2)
    for trial in range(40):
        effects = {"tlm": 8.0, "random-corpus": 0.0, **{m: 8.0 + rng.normal(0, 1.5) for m in ("iss", "random")}}
        effects |= {"iss-bottom": 8.0, "iss-cosine": 8.0 + rng.normal(0, 1.5)}
        verdict = task_verdict(_scores(effects, 5, rng, noise=1.0), margin=1.0)
        assert verdict.control_passed, trial
        for c in verdict.comparisons:
            assert (c.low > 0 or c.high < 0) == (c.p_adjusted < 0.05), (trial, c)
            assert c.level >= 0.95  # never looser than the unadjusted interval


def test_verdicts_group_result_rows_by_task_and_pair_by_pretraining_seed():
    rows = [
        {"method": m, "task": "scierc", "budget": "", "seed": f, "pretrain_seed": p, "test": t}
        for m, base in (("tlm", 0.6), ("random-corpus", 0.5))
        for p in (100, 101, 102)
        for f, t in ((0, base + p / 1000), (1, base + p / 1000 + 0.01))
    ]
    (verdict,) = verdicts(rows, margin=1.0)
    assert verdict.task == "scierc" and verdict.control.units == [100, 101, 102]
    assert verdict.control.differences == pytest.approx([10.0, 10.0, 10.0])  # mean of two fine-tunes per seed
    assert verdict.control_passed and verdict.comparisons == []


def test_seeds_for_power_reaches_the_power_it_promises():
    n = seeds_for_power(effect=3.0, sd=2.0, margin=1.0)
    assert n is not None and n > 2
    rng = np.random.default_rng(3)

    def cleared(units: int) -> float:
        draws = rng.normal(3.0, 2.0, (20000, units))
        low = draws.mean(1) - stats.t.ppf(0.975, units - 1) * draws.std(1, ddof=1) / np.sqrt(units)
        return float((low > 1.0).mean())

    assert cleared(n) >= 0.79 and cleared(n - 1) < 0.8
    assert seeds_for_power(effect=0.9, sd=1.0, margin=1.0) is None  # below the margin: no seed count does it
    assert seeds_for_power(effect=1.05, sd=3.0, margin=1.0, most=50) is None


def test_the_family_is_configurable_and_checked():
    assert parse_comparison("iss-cosine - tlm") == ("iss-cosine", "tlm")
    config = IssConfig.model_validate({"evaluation": {"family": ["iss - tlm"], "control_margin": 2.0}})
    assert config.evaluation.comparisons == [("iss", "tlm")]
    with pytest.raises(ValueError, match="unknown method"):
        IssConfig.model_validate({"evaluation": {"family": ["iss - bm99"]}})
    with pytest.raises(ValueError, match="spaces around"):
        IssConfig.model_validate({"evaluation": {"family": ["iss-tlm"]}})
