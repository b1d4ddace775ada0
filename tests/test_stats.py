"""Paired bootstrap differences: the mean, an interval that holds it, and ties inside the noise."""

from __future__ import annotations

import pytest

from iss.report import differences_rows, mechanism_differences, mechanism_summary, write_results
from iss.stats import paired_bootstrap


def test_constant_difference_has_a_degenerate_interval_and_wins():
    diff = paired_bootstrap({0: 0.7, 1: 0.6, 2: 0.9}, {0: 0.5, 1: 0.4, 2: 0.7})
    assert diff.mean == pytest.approx(0.2)
    assert diff.low == pytest.approx(0.2) and diff.high == pytest.approx(0.2)
    assert diff.verdict == "better" and diff.n == 3


def test_differences_of_both_signs_are_a_tie_and_pairing_uses_shared_seeds_only():
    first = {0: 0.5, 1: 0.7, 2: 0.4, 3: 0.6, 9: 1.0}
    second = {0: 0.6, 1: 0.5, 2: 0.5, 3: 0.5}
    diff = paired_bootstrap(first, second, resamples=5000, seed=1)
    assert diff.n == 4 and diff.mean == pytest.approx(0.025)
    assert diff.low < 0 < diff.high and diff.verdict == "tie"
    assert paired_bootstrap(second, first).verdict == "tie"
    with pytest.raises(ValueError, match="no seed"):
        paired_bootstrap({0: 1.0}, {1: 1.0})


def test_a_consistent_loss_is_worse():
    assert paired_bootstrap({s: 0.4 + 0.01 * s for s in range(5)}, {s: 0.5 + 0.02 * s for s in range(5)}).verdict == (
        "worse"
    )


def test_differences_table_pairs_methods_per_task_and_skips_absent_ones():
    rows = [
        {"method": m, "task": "t", "seed": s, "test": base + 0.01 * s}
        for m, base in (("iss", 0.5), ("tlm", 0.4), ("random-corpus", 0.3))
        for s in range(3)
    ]
    lines = {line["comparison"]: line for line in differences_rows(rows, resamples=500)}
    assert set(lines) == {"iss - tlm", "tlm - random-corpus"}  # random, cosine, iss-bottom did not run
    assert lines["iss - tlm"]["mean"] == pytest.approx(10.0) and lines["iss - tlm"]["verdict"] == "better"
    assert lines["tlm - random-corpus"]["meaning"].startswith("positive control")


def test_mechanism_losses_keep_four_decimals():
    from iss.report import markdown_rows, precise_losses

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
    lines = {line["comparison"]: line for line in mechanism_differences(rows, resamples=500)}
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
    write_results(runs, tmp_path, mechanism=rows, bootstrap=500)
    assert "paired over repeats" in (tmp_path / "results.md").read_text()
