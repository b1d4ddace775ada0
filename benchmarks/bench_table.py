"""The paper's Table 3 at CPU scale: ISS vs TLM vs random vs no pretraining, same budget and steps, 3 seeds.

Usage: python benchmarks/bench_table.py [--tasks acl_arc scierc chemprot] [--runs-root runs/bench]

Runs `iss run configs/TASK.yaml` per task in a child process (wall time and peak RSS via wait4), merges the
per-run scores into one table in the paper's layout and writes benchmarks/results/table.md and table.json, with
the time `iss run` estimated up front next to the time its stages took and the calibration (stage factors learned
from this machine's earlier runs) the estimate applied. Tasks not run keep their rows from the last table.json.
Run folders are kept under --runs-root, so a rerun reuses every finished stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from measure import run_measured

from iss.comparison.tables import markdown, results_table
from iss.config.io import load_config
from iss.pipeline.estimate import ESTIMATE_FILE, FORECAST_FILE, RunEstimate
from iss.runs.folder import MANIFEST_FILE
from iss.stages.plan import RunPlan

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TASKS = ["acl_arc", "scierc", "chemprot"]


def run_task(task: str, runs_root: Path) -> dict:
    run_dir = runs_root / task
    command = [sys.executable, "-m", "iss", "run", str(CONFIGS / f"{task}.yaml"), "--run-dir", str(run_dir), "--quiet"]
    measured = run_measured(command, f"iss run {task}")
    report = json.loads((run_dir / "results" / "results.json").read_text(encoding="utf-8"))
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    plan = RunPlan(load_config(CONFIGS / f"{task}.yaml"))
    with_pool, forecast = (RunEstimate.load(run_dir / name) for name in (ESTIMATE_FILE, FORECAST_FILE))
    estimated = with_pool.against_with_forecast(forecast, manifest, plan)
    return {
        "task": task,
        "wall_seconds": measured.wall_seconds,
        "peak_rss_gib": measured.peak_rss_gib,
        "estimate_seconds": estimated,
        **report,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--runs-root", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    saved = RESULTS / "table.json"
    by_task = {r["task"]: r for r in json.loads(saved.read_text(encoding="utf-8"))["tasks"]} if saved.is_file() else {}
    for task in args.tasks:  # the tasks run now replace their rows; the others' stay as measured
        print(f"iss run {task} ...", file=sys.stderr, flush=True)
        by_task[task] = run_task(task, args.runs_root)
    per_task = sorted(by_task.values(), key=lambda r: TASKS.index(r["task"]) if r["task"] in TASKS else len(TASKS))
    runs = [run for result in per_task for run in result["runs"]]
    table = results_table(runs)
    lines = [
        "Test F1 x 100 (micro for ChemProt, macro for ACL-ARC and SciERC), mean ± std over seeds, at the best dev",
        "epoch; every pretrained method uses the same subset budget and pretraining steps. Data size and FLOPs",
        "(6 x pretraining tokens x parameters) are averaged over tasks.",
        "",
        markdown(table),
        "| task | wall s (select + pretrain + fine-tune, all methods and seeds) | peak RSS GiB |",
        "| --- | ---: | ---: |",
        *[f"| {r['task']} | {r['wall_seconds']} | {r['peak_rss_gib']} |" for r in per_task],
        "",
        "The estimates `iss run` prints, before any stage (pool forecast: estimate-forecast.json) and once the pool",
        "exists (estimate.json), against the stages they price as the manifest timed them (seconds):",
        "",
        "| task | stage | forecast s | estimated s | measured s | measured / estimated | calibration applied |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        *[
            f"| {r['task']} | {kind} | {row['forecast']:.1f} | {row['estimated']:.1f} | {row['measured']:.1f} | "
            f"{row['measured'] / row['estimated']:.2f} | {_factor(row.get('factor'))} |"
            for r in per_task
            for kind, row in r["estimate_seconds"].items()
            if row["estimated"] > 0
        ],
    ]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    machine = {"platform": platform.platform(), "cpus": os.cpu_count()}
    summary = {"machine": machine, "tasks": per_task, "table": table}
    (RESULTS / "table.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")


def _factor(factor: float | None) -> str:
    """A stage factor as the table shows it: none for kinds the probes do not price."""
    return "" if factor is None else f"{factor:.2f}"


if __name__ == "__main__":
    main()
