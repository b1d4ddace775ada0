"""The evidence benchmark's tables read from a run folder (benchmarks/bench_evidence.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iss.report import differences_rows
from iss.runs import RunFolder, StageResult

from .conftest import REPO, require_shared

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_evidence
import carry
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


def test_every_committed_entrys_differences_are_recomputed_from_its_own_per_seed_rows() -> None:
    """evidence.json holds each entry's runs (method, pretraining and fine-tuning seed, test F1) and its paired
    differences: the differences must be what the t-interval gives on those rows, for every entry."""
    entries = json.loads((bench_evidence.RESULTS / "evidence.json").read_text(encoding="utf-8"))["entries"]
    assert entries
    for entry in entries:
        recomputed = {row["comparison"]: row for row in differences_rows(entry["runs"])}
        recorded = {row["comparison"]: row for row in entry["differences"]}
        assert recomputed.keys() == recorded.keys(), entry_key(entry)
        for comparison, row in recorded.items():
            for key in ("mean", "ci95_low", "ci95_high", "verdict"):
                assert recomputed[comparison][key] == row[key], (entry_key(entry), comparison, key)
        if "superseded" not in entry:
            passed = recorded["tlm - random-corpus"]["ci95_low"] > bench_evidence.GATE_MARGIN
            assert entry["positive_control"]["passed"] == passed


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


def fingerprint(name: str, config: str = "") -> str:
    """A stage's fingerprint: the same on every machine for the same name and config, 16 hex digits as iss's."""
    return hashlib.sha256(f"{name}{config}".encode()).hexdigest()[:16]


def finished_stage(
    run: RunFolder,
    name: str,
    summary: dict,
    files: dict[str, str] | None = None,
    config: str = "",
    built_on: tuple[StageResult, ...] = (),
) -> StageResult:
    """A finished stage whose recorded config names the fingerprints of the stages it was computed from."""
    parts = {"upstream": [stage.fingerprint for stage in built_on]}
    with run.stage(name, fingerprint(name, config), parts) as (folder, recorded):
        recorded.update(summary)
        for file, text in (files or {}).items():
            (folder / file).write_text(text, encoding="utf-8")
    result = run.finished(name, fingerprint(name, config))
    assert result is not None
    run.update_manifest([result], {})
    return result


def test_carry_brings_results_to_a_fresh_folder_and_drops_those_built_on_a_changed_upstream(tmp_path: Path) -> None:
    """Fine-tune and mechanism stages travel (models do not); a fresh folder reuses them by fingerprint; a
    recomputed upstream stage whose summary differs stops the check for the results built on it, which ``drop``
    forgets (here and in the carry folder) so that the run makes them again, and the others stay."""
    first = RunFolder(tmp_path / "runs" / "evidence" / "further" / "chemprot")
    finished_stage(first, "select-iss", {"docs": 2}, {"ids.npy": "3 7"})
    pretrain = finished_stage(first, "pretrain-iss-seed0", {"mlm": 2.5}, {"model.bin": "weights"})
    finished_stage(first, "finetune-iss-seed0", {"test": 0.7}, {"scores.json": "{}"}, built_on=(pretrain,))
    finished_stage(first, "mechanism-iss", {"test_f1": 0.1})
    root = tmp_path / "carry"

    carried = ["finetune-iss-seed0", "mechanism-iss", "select-iss"]
    assert sorted(carry.carry_out(first.root, root)) == carried
    assert carry.carry_dir(first.root, root) == root / "evidence" / "further" / "chemprot"
    assert not (carry.carry_dir(first.root, root) / "pretrain-iss-seed0").exists()  # models stay behind

    fresh = RunFolder(tmp_path / "elsewhere" / "runs" / "evidence" / "further" / "chemprot")
    assert sorted(carry.carry_in(fresh.root, root)) == carried
    assert (fresh.root / "select-iss" / "ids.npy").read_text(encoding="utf-8") == "3 7"
    assert fresh.finished("finetune-iss-seed0", fingerprint("finetune-iss-seed0")).summary["test"] == 0.7
    assert fresh.finished("pretrain-iss-seed0", fingerprint("pretrain-iss-seed0")) is None  # recomputed there

    finished_stage(fresh, "pretrain-iss-seed0", {"mlm": 2.5, "seconds": 9.0})  # timing may differ
    carry.check(fresh.root, root)
    changed = finished_stage(fresh, "pretrain-iss-seed0", {"mlm": 2.6})
    assert carry.stale_results(fresh.root, root) == {"finetune-iss-seed0": ["pretrain-iss-seed0"]}
    assert carry.mismatches(fresh.root, root) == ["pretrain-iss-seed0"]
    with pytest.raises(SystemExit, match=r"pretrain-iss-seed0.*finetune-iss-seed0.*drop"):
        carry.carry_out(fresh.root, root)

    assert carry.drop(fresh.root, root) == ["finetune-iss-seed0"]
    assert not (fresh.root / "finetune-iss-seed0").exists()
    assert not (carry.carry_dir(fresh.root, root) / "finetune-iss-seed0").exists()
    assert (fresh.root / "mechanism-iss").is_dir()
    carry.check(fresh.root, root)
    finished_stage(fresh, "finetune-iss-seed0", {"test": 0.72}, {"scores.json": "{}"}, built_on=(changed,))
    assert carry.carry_out(fresh.root, root) == ["finetune-iss-seed0"]
    third = RunFolder(tmp_path / "third" / "runs" / "evidence" / "further" / "chemprot")
    carry.carry_in(third.root, root)
    assert third.finished("finetune-iss-seed0", fingerprint("finetune-iss-seed0")).summary["test"] == 0.72
    finished_stage(third, "pretrain-iss-seed0", {"mlm": 2.6})  # the summary carried now is the second machine's
    carry.check(third.root, root)


def test_a_result_whose_upstream_is_not_recomputed_yet_counts_as_built_on_any_changed_stage(tmp_path: Path) -> None:
    """Which recomputed stages a carried result rests on is known only once its upstream is in the folder: until
    then a changed stage makes it stale; once its upstream repeats, a change elsewhere does not."""
    first = RunFolder(tmp_path / "runs" / "chemprot")
    finished_stage(first, "warmup", {"task": 1.5})
    pretrain = finished_stage(first, "pretrain-tlm-seed0", {"mlm": 6.45})
    finished_stage(first, "finetune-tlm-seed0", {"test": 0.76}, built_on=(pretrain,))
    root = tmp_path / "carry"
    carry.carry_out(first.root, root)
    fresh = RunFolder(tmp_path / "fresh" / "runs" / "chemprot")
    carry.carry_in(fresh.root, root)

    finished_stage(fresh, "warmup", {"task": 1.4})
    assert carry.built_on(fresh.root, "finetune-tlm-seed0") is None
    assert carry.stale_results(fresh.root, root) == {"finetune-tlm-seed0": ["warmup"]}
    finished_stage(fresh, "pretrain-tlm-seed0", {"mlm": 6.45})
    assert carry.built_on(fresh.root, "finetune-tlm-seed0") == {"pretrain-tlm-seed0"}
    assert carry.stale_results(fresh.root, root) == {}
    carry.check(fresh.root, root)


def test_carry_check_takes_float_noise_but_not_another_count(tmp_path: Path) -> None:
    """The same computation on another CPU repeats its counts exactly and its losses only to float noise: a loss
    off in the fifth digit passes, a loss off in the third or one document more stops the check."""
    carried = {"mlm": 7.4, "docs": 1000, "curve": [{"step": 5, "mlm": 10.5125}], "method": "iss", "met": True}
    first = RunFolder(tmp_path / "runs" / "chemprot")
    warmup = finished_stage(first, "warmup", carried)
    finished_stage(first, "mechanism-none", {"test_f1": 0.55}, built_on=(warmup,))
    root = tmp_path / "carry"
    carry.carry_out(first.root, root)
    fresh = RunFolder(tmp_path / "fresh" / "runs" / "chemprot")
    carry.carry_in(fresh.root, root)

    finished_stage(fresh, "warmup", carried | {"mlm": 7.3999, "curve": [{"step": 5, "mlm": 10.5126}]})
    assert carry.deviations(fresh.root, root)["warmup"] == pytest.approx(1e-4 / 7.4)  # the largest of the two
    carry.check(fresh.root, root)
    changed = [
        {"mlm": 7.39},  # 0.14 %: beyond float noise
        {"docs": 1001},
        {"curve": [{"step": 6, "mlm": 10.5125}]},
        {"curve": []},
        {"method": "tlm"},
        {"met": False},
    ]
    for change in changed:
        finished_stage(fresh, "warmup", carried | change)
        assert carry.mismatches(fresh.root, root) == ["warmup"], change
    finished_stage(fresh, "warmup", {key: value for key, value in carried.items() if key != "met"})
    assert carry.mismatches(fresh.root, root) == ["warmup"]


def test_carry_replaces_a_result_remade_under_a_changed_config(tmp_path: Path) -> None:
    """A changed config (here bf16) remakes stages under new fingerprints: their new results replace the carried
    ones, and differing summaries under different fingerprints are not a mismatch."""
    run = RunFolder(tmp_path / "runs" / "chemprot")
    warmup = finished_stage(run, "warmup", {"task": 1.5})
    finished_stage(run, "finetune-none-seed0", {"test": 0.74}, built_on=(warmup,))
    root = tmp_path / "carry"
    carry.carry_out(run.root, root)

    warmup = finished_stage(run, "warmup", {"task": 1.4}, config="-bf16")
    finished_stage(run, "finetune-none-seed0", {"test": 0.75}, config="-bf16", built_on=(warmup,))
    assert carry.mismatches(run.root, root) == []
    assert carry.carry_out(run.root, root) == ["finetune-none-seed0"]
    fresh = tmp_path / "fresh" / "runs" / "chemprot"
    carry.carry_in(fresh, root)
    fresh_run = RunFolder(fresh)
    assert (
        fresh_run.finished("finetune-none-seed0", fingerprint("finetune-none-seed0", "-bf16")).summary["test"] == 0.75
    )


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
    command += ["--dry-run", "--run-dir", str(tmp_path / "run"), "--minutes", "0.05"]
    done = subprocess.run(
        command, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith("device cpu; estimated time for a fresh run folder")
    assert lines[1].startswith("over the 0.05-minute budget: pretrain.steps 6 -> ")
    record = json.loads((tmp_path / "run" / "gpu_protocol_chemprot.json").read_text(encoding="utf-8"))
    assert record["dry_run"] and record["pretrain_steps"] < 6 and record["estimate"] < record["estimate_first"]
    methods = ["tlm", "random-corpus", "none", "iss", "random", "iss-bottom"]
    expected = {(m, None if m == "none" else s, s) for m in methods for s in (0, 1)}
    assert {(r["method"], r["pretrain_seed"], r["seed"]) for r in record["runs"]} == expected
    assert record["positive_control"]["comparison"] == "tlm - random-corpus"
