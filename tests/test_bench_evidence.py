"""The evidence benchmark's tables read from a run folder (benchmarks/bench_evidence.py)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from scipy import stats

from iss.comparison.tables import differences_rows
from iss.comparison.verdict import seeds_for_power
from iss.config.schema import IssConfig

from .conftest import REPO, require_shared

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_evidence
from bench_evidence import entry_key


def write_ids(path: Path, ids: range) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"corpus_id": list(ids)}), path)


def test_overlap_counts_shared_pool_documents_against_chance(tmp_path: Path) -> None:
    """Pairs of pool subsets report their shared documents and a * b / pool; a subset drawn from outside the pool
    (the random corpus sample) and a method whose subset was never selected are left out."""
    write_ids(tmp_path / "retrieval" / "pool.parquet", range(100))
    write_ids(tmp_path / "select-iss" / "subset.parquet", range(20))
    write_ids(tmp_path / "select-iss-bottom" / "subset.parquet", range(10, 30))
    write_ids(tmp_path / "select-tlm" / "subset.parquet", range(50, 90))
    write_ids(tmp_path / "select-random-corpus" / "subset.parquet", range(500, 520))
    subsets = [{"method": m} for m in ("iss", "iss-bottom", "tlm", "random-corpus", "random")]

    rows = bench_evidence.overlap_rows(tmp_path, subsets)

    assert rows == [
        {"subsets": "iss & iss-bottom", "shared": 10, "by_chance": 4},
        {"subsets": "iss & tlm", "shared": 0, "by_chance": 8},
        {"subsets": "iss-bottom & tlm", "shared": 0, "by_chance": 8},
    ]


def test_overlap_is_empty_without_a_pool(tmp_path: Path) -> None:
    write_ids(tmp_path / "select-iss" / "subset.parquet", range(20))
    assert bench_evidence.overlap_rows(tmp_path, [{"method": "iss"}]) == []


def test_summary_puts_every_entrys_controls_and_iss_verdicts_in_one_row(tmp_path: Path) -> None:
    """A row per entry, base run before its variants; a cell is the mean with its CI and a verdict only where the
    CI excludes zero; a comparison an entry lacks (a control-only variant) stays blank."""

    def difference(comparison: str, mean: float, low: float, high: float, verdict: str) -> dict:
        return {"comparison": comparison, "mean": mean, "ci95_low": low, "ci95_high": high, "verdict": verdict}

    base = {
        "setting": "scratch",
        "task": "acl_arc",
        "differences": [
            difference("tlm - random-corpus", -3.96, -4.68, -2.95, "worse"),
            difference("iss - tlm", 4.34, 1.07, 6.56, "better"),
            difference("iss - random", 0.5, -1.0, 2.0, "tie"),
        ],
        "best_epochs": {"at_last_epoch": 6, "runs": 35},
    }
    variant = {
        "setting": "scratch",
        "task": "acl_arc",
        "variant": "budget 4000 docs",
        "differences": [difference("tlm - random-corpus", -6.65, -7.71, -5.37, "worse")],
    }

    rows = bench_evidence.summary_rows([variant, base])

    assert [row["variant"] for row in rows] == ["", "budget 4000 docs"]
    assert rows[0]["positive control: TLM - random corpus"] == "-3.96 [-4.68, -2.95] worse"
    assert rows[0]["ISS - TLM"] == "+4.34 [1.07, 6.56] better"
    assert rows[0]["ISS - random (pool)"] == "+0.50 [-1.00, 2.00]"
    assert rows[0]["negative control: ISS - bottom"] == ""
    assert rows[0]["runs at the last epoch"] == "6 of 35"
    assert rows[0]["control passed"] == "" and rows[1]["control passed"] == ""
    passed = bench_evidence.summary_rows([{**base, "positive_control": {"passed": True}}])[0]["control passed"]
    assert passed == "yes"
    assert bench_evidence.summary_rows([{**base, "superseded": "old"}])[0]["control passed"] == "superseded"
    assert rows[1]["ISS - TLM"] == rows[1]["runs at the last epoch"] == ""


@pytest.mark.parametrize("name", ["evidence", "causal_chemprot"])
def test_every_committed_entrys_differences_are_recomputed_from_its_own_per_seed_rows(name: str) -> None:
    """Each results JSON holds its entries' runs (method, pretraining and fine-tuning seed, test F1) and their paired
    differences: the differences must be what the t-interval gives on those rows, for every entry."""
    path = bench_evidence.RESULTS / f"{name}.json"
    if name != "evidence" and not path.is_file():
        pytest.skip(f"{path.name} not written yet")
    entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
    assert entries
    for entry in (entry for entry in entries if "stopped" not in entry):  # a stopped regime has no runs
        recomputed = {row["comparison"]: row for row in differences_rows(entry["runs"])}
        recorded = {row["comparison"]: row for row in entry["differences"]}
        assert recomputed.keys() == recorded.keys(), entry_key(entry)
        for comparison, row in recorded.items():
            for key in ("mean", "ci95_low", "ci95_high", "verdict"):
                assert recomputed[comparison][key] == row[key], (entry_key(entry), comparison, key)
        if "superseded" not in entry:
            passed = recorded["tlm - random-corpus"]["ci95_low"] > bench_evidence.GATE_MARGIN
            assert entry["positive_control"]["passed"] == passed


def test_save_merges_entries_into_the_named_json_and_writes_its_markdown_beside_it(tmp_path: Path) -> None:
    """--output names the results files: an entry saved there joins the ones already in it (keyed by setting,
    task and variant), and the Markdown beside it renders them all."""
    path = tmp_path / "causal_chemprot.json"
    first = {"setting": "causal", "task": "chemprot", "config": "configs/causal/chemprot.yaml", "stopped": "one"}
    bench_evidence.save(path, first)
    bench_evidence.save(path, {**first, "task": "scierc", "config": "configs/causal/scierc.yaml"})
    entries = bench_evidence.save(path, {**first, "stopped": "two"})
    assert sorted(entries) == [("causal", "chemprot", None), ("causal", "scierc", None)]
    assert [e["stopped"] for e in json.loads(path.read_text(encoding="utf-8"))["entries"]] == ["two", "one"]
    rendered = path.with_suffix(".md").read_text(encoding="utf-8")
    assert "chemprot — continued pretraining of SmolLM2-135M" in rendered and "stopped. two" in rendered


def test_design_names_the_seeds_and_passes_the_control_only_above_the_margin() -> None:
    runs = [
        {"method": m, "pretrain_seed": p, "seed": f, "test": t}
        for m, base in (("tlm", 0.60), ("random-corpus", 0.57))
        for p in (0, 1, 2)
        for f, t in ((0, base + 0.004 * p), (1, base + 0.002 * p))
    ]
    differences = differences_rows(runs)
    control = next(row for row in differences if row["comparison"] == "tlm - random-corpus")
    assert control["mean"] == pytest.approx(3.0) and control["seeds"] == 3  # units: pretraining seeds
    design = bench_evidence.design(runs, differences)
    assert design["seeds"] == {"pretraining": [0, 1, 2], "finetuning": [0, 1]}
    assert design["positive_control"]["passed"]
    small = [{**row, "test": row["test"] - 0.025 * (row["method"] == "tlm")} for row in runs]  # +0.5 point
    assert not bench_evidence.design(small, differences_rows(small))["positive_control"]["passed"]


@pytest.mark.slow
def test_gpu_protocol_dry_run_prints_its_estimate_first_fits_the_budget_and_writes_every_run(tmp_path: Path) -> None:
    """benchmarks/gpu_protocol.py at toy scale on the CPU: the estimate is the first line, a budget below it lowers
    pretrain.steps, and the JSON holds every method's runs with their pretraining seeds and the positive control."""
    require_shared()
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "gpu_protocol.py"),
        str(REPO / "configs" / "gpu" / "chemprot.yaml"),
    ]
    command += ["--dry-run", "--run-dir", str(tmp_path / "run"), "--minutes", "0.1"]
    cache = tmp_path / "cache"  # a machine whose selections are known to be quick: the budget then hinges on the
    cache.mkdir()  # probed stages alone, not on the 5 s-per-selection guess made before any run
    (cache / "calibration.json").write_text(json.dumps({"select_seconds": 0.01}), encoding="utf-8")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "ISS_CACHE": str(cache)}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("device cpu; estimated time for a fresh run folder")
    assert lines[1].startswith("estimated time for a fresh run folder (with the BM25 pool)")
    assert lines[2].startswith("over the 0.1-minute budget: pretrain.steps 6 -> ")
    record = json.loads((tmp_path / "run" / "gpu_protocol_chemprot.json").read_text(encoding="utf-8"))
    assert record["dry_run"] and record["pretrain_steps"] < 6 and record["estimate"] < record["estimate_first"]
    methods = ["tlm", "random-corpus", "none", "iss", "random", "iss-bottom"]
    expected = {(m, None if m == "none" else s, s) for m in methods for s in (0, 1)}
    assert {(r["method"], r["pretrain_seed"], r["seed"]) for r in record["runs"]} == expected
    assert record["positive_control"]["comparison"] == "tlm - random-corpus"


def test_a_variants_command_parses_back_to_its_overrides_in_a_shell() -> None:
    """The command printed for a variant entry is copied into a shell: each override, a list with spaces too, must
    come back as one --set argument whose value parses to what the variant set."""
    overrides = {"finetune.seeds": [0, 1, 2, 3, 4], "finetune.learning_rate": 3e-3, "selection.budget": "5000 docs"}
    entry = {"config": "configs/gate/scierc-general.yaml", "variant": "probe", "overrides": overrides}
    words = shlex.split(bench_evidence.run_command(entry))
    assert words[:3] == ["iss", "run", "configs/gate/scierc-general.yaml"]
    assert words[3::2] == ["--set"] * 3
    parsed = dict(word.split("=", 1) for word in words[4::2])
    assert {key: yaml.safe_load(value) for key, value in parsed.items()} == overrides
    assert bench_evidence.run_command({**entry, "variant": None}) == "iss run configs/gate/scierc-general.yaml"


def test_reserved_seeds_and_seeds_other_than_the_plans_are_refused() -> None:
    """Pretraining seeds 40-59 are kept for replication; a confirmatory entry is the run its plan fixed."""
    with pytest.raises(SystemExit, match="reserved"):
        bench_evidence.refuse_reserved([39, 41], "search/scierc")
    bench_evidence.refuse_reserved([100, 101, 102, 103], "search/scierc")  # search seeds pass
    plan = IssConfig.model_validate({"finetune": {"seeds": [200, 201, 202]}})
    bench_evidence.check_against_plan({"seeds": {"pretraining": [200, 201, 202]}}, plan)
    with pytest.raises(SystemExit, match="differ from its plan"):
        bench_evidence.check_against_plan({"seeds": {"pretraining": [200, 201]}}, plan)
    reserved = IssConfig.model_validate({"finetune": {"seeds": [58, 59, 60]}})
    with pytest.raises(SystemExit, match="reserved"):
        bench_evidence.check_against_plan({"seeds": {"pretraining": [58, 59, 60]}}, reserved)


def test_the_search_rule_sizes_the_confirmatory_run_from_the_conservative_effect() -> None:
    """Each search candidate: the control's paired differences over its seeds, the one-sided 80 % lower bound,
    the seeds for 80 % power at it, and the cost against 3 days of this machine."""

    def entry(differences: list[float], variant: str | None = None) -> dict:
        runs = [
            {
                "method": m,
                "task": "scierc",
                "pretrain_seed": 100 + i,
                "seed": 100 + i,
                "test": (50 + d * (m == "tlm")) / 100,
            }
            for i, d in enumerate(differences)
            for m in ("tlm", "random-corpus")
        ]
        stage = {"pretraining": 500.0, "fine-tuning": 20.0, "mlm-head": 1000.0}
        return {"setting": "search", "task": "scierc", "variant": variant, "runs": runs, "seconds_per_stage": stage}

    strong, weak = entry([6.0, 7.0, 5.5, 6.5]), entry([2.1, 1.9, -1.0, 2.0], "weak")
    rows = {row["candidate"]: row for row in bench_evidence.search_rows([strong, weak])}
    diffs = np.array([6.0, 7.0, 5.5, 6.5])
    bound = diffs.mean() - stats.t.ppf(0.8, 3) * diffs.std(ddof=1) / 2
    assert rows["scierc: probe"]["conservative effect"] == pytest.approx(bound, abs=0.01)
    seeds = seeds_for_power(bound, diffs.std(ddof=1), 1.0)
    assert rows["scierc: probe"]["seeds for 80 % power"] == seeds
    assert rows["scierc: probe"]["confirmatory CPU hours"] == round((seeds * (7 * 500 + 8 * 20) + 1000) / 3600, 1)
    assert rows["scierc: probe"]["eligible"] == "yes"
    assert rows["scierc: weak"]["conservative effect"] < 1 and rows["scierc: weak"]["eligible"] == "no"
