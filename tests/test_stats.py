"""Paired differences over pretraining seeds: t-intervals as scipy computes them, pairing by seed id, ties."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from iss.comparison.stats import paired_difference, sample_std, t_interval
from iss.comparison.tables import differences_rows, mechanism_differences, mechanism_summary, write_results


def test_t_interval_is_scipys_on_a_non_degenerate_sample():
    values = [1.3, -0.4, 2.2, 0.9, 0.1]
    expected = stats.t.interval(0.95, 4, loc=np.mean(values), scale=np.std(values, ddof=1) / np.sqrt(5))
    assert t_interval(values) == pytest.approx(expected)
    assert stats.ttest_1samp(values, 0).confidence_interval(0.95) == pytest.approx(t_interval(values))
    assert t_interval([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2), abs=1e-15)  # no spread: the point itself
    assert all(np.isnan(t_interval([0.5])))
    assert sample_std([1.0, 2.0, 3.0]) == pytest.approx(1.0)  # ddof = 1 (ddof = 0 gives 0.816)


def test_constant_difference_has_a_degenerate_interval_and_wins():
    diff = paired_difference({0: 0.7, 1: 0.6, 2: 0.9}, {0: 0.5, 1: 0.4, 2: 0.7})
    assert diff.mean == pytest.approx(0.2)
    assert diff.low == pytest.approx(0.2) and diff.high == pytest.approx(0.2)
    assert diff.verdict == "better" and diff.n == 3


def test_pairing_is_by_seed_id_not_by_position():
    """The same values listed in another order pair as before; a seed only one method has is left out."""
    first = {2: 0.9, 0: 0.5, 1: 0.6, 7: 5.0}
    second = {0: 0.4, 1: 0.45, 2: 0.7}
    diff = paired_difference(first, second)
    assert diff.n == 3 and diff.mean == pytest.approx((0.1 + 0.15 + 0.2) / 3)
    assert diff.std == pytest.approx(0.05)
    by_position = np.array([0.9, 0.5, 0.6]) - np.array([0.4, 0.45, 0.7])  # the same mean, another spread
    assert diff.std != pytest.approx(np.std(by_position, ddof=1))
    assert (diff.low, diff.high) == pytest.approx(t_interval([0.1, 0.15, 0.2]))
    with pytest.raises(ValueError, match="no seed"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_fine_tuning_seeds_are_averaged_within_a_pretraining_seed():
    """Three pretrainings with two fine-tunes each are three units, not six."""
    first = {0: [0.60, 0.64], 1: [0.70, 0.66], 2: [0.58, 0.62]}
    second = {0: [0.50, 0.52], 1: [0.55, 0.57], 2: [0.60, 0.58]}
    diff = paired_difference(first, second)
    units = [0.62 - 0.51, 0.68 - 0.56, 0.60 - 0.59]
    assert diff.n == 3 and diff.mean == pytest.approx(np.mean(units))
    assert (diff.low, diff.high) == pytest.approx(t_interval(units))


def test_differences_of_both_signs_are_a_tie_and_one_unit_has_no_verdict():
    first = {0: 0.5, 1: 0.7, 2: 0.4, 3: 0.6}
    second = {0: 0.6, 1: 0.5, 2: 0.5, 3: 0.5}
    diff = paired_difference(first, second)
    assert diff.low < 0 < diff.high and diff.verdict == "tie"
    assert paired_difference({0: 0.9}, {0: 0.1}).verdict == "n/a"


def test_a_consistent_loss_is_worse():
    first, second = {s: 0.4 + 0.01 * s for s in range(5)}, {s: 0.5 + 0.02 * s for s in range(5)}
    assert paired_difference(first, second).verdict == "worse"


def test_differences_table_pairs_methods_per_task_and_skips_absent_ones():
    rows = [
        {"method": m, "task": "t", "seed": s, "test": base + 0.01 * s}
        for m, base in (("iss", 0.5), ("tlm", 0.4), ("random-corpus", 0.3))
        for s in range(3)
    ]
    lines = {line["comparison"]: line for line in differences_rows(rows)}
    assert set(lines) == {"iss - tlm", "tlm - random-corpus"}  # random, cosine, iss-bottom did not run
    assert lines["iss - tlm"]["mean"] == pytest.approx(10.0) and lines["iss - tlm"]["verdict"] == "better"
    assert lines["tlm - random-corpus"]["meaning"].startswith("positive control")


def test_mechanism_losses_keep_four_decimals():
    from iss.comparison.tables import markdown_rows, precise_losses

    rows = precise_losses([{"method": "iss", "test_task_loss": 1.35101, "test_f1": 0.1127, "steps": 30}])
    assert rows == [{"method": "iss", "test_task_loss": "1.3510", "test_f1": 0.1127, "steps": 30}]
    assert "| iss | 1.3510 | 0.113 | 30 |" in markdown_rows(rows)


def test_repeated_mechanism_checks_pair_over_repeats_and_read_as_loss_taken_off(tmp_path):
    losses = {"iss": [1.20, 1.25, 1.22], "tlm": [1.30, 1.32, 1.35], "random-corpus": [1.28, 1.40, 1.31]}
    rows = [
        {"method": method, "task": "t", "repeat": r, "test_task_loss": loss, "test_f1": 0.5}
        for method, values in losses.items()
        for r, loss in enumerate(values)
    ]
    rows.append({"method": "none", "task": "t", "repeat": 0, "test_task_loss": 1.1, "test_f1": 0.6})
    lines = {line["comparison"]: line for line in mechanism_differences(rows)}
    assert set(lines) == {"iss - tlm", "tlm - random-corpus"}
    assert lines["iss - tlm"]["mean"] == pytest.approx(0.1) and lines["iss - tlm"]["verdict"] == "better"
    assert lines["iss - tlm"]["repeats"] == 3
    assert lines["tlm - random-corpus"]["verdict"] == "tie"  # -0.02, +0.08, -0.04
    summary = {line["method"]: line for line in mechanism_summary(rows)}
    assert summary["tlm"]["repeats"] == 3 and summary["tlm"]["test_task_loss"].startswith("1.3233 ± ")
    assert summary["none"]["repeats"] == 1
    single = [{k: v for k, v in row.items() if k != "repeat"} for row in rows if row["repeat"] == 0]
    assert mechanism_differences(single) == []  # one check per subset: nothing to pair
    runs = [{"method": "iss", "task": "t", "seed": 0, "test": 0.5, "dev": 0.5, "subset_docs": 1, "flops": 1}]
    write_results(runs, tmp_path, mechanism=rows)
    assert "paired over repeats" in (tmp_path / "results.md").read_text()
