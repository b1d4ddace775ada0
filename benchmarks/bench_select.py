"""Wall time and peak memory of `iss select` from a cold run folder, per method, with per-stage seconds.

Usage: python benchmarks/bench_select.py [--config configs/chemprot.yaml] [--methods iss tlm random]
Prints a Markdown table and writes benchmarks/results/select_<task>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
from measure import run_measured

from iss.config.io import load_config
from iss.stages.plan import select_stage

RESULTS = Path(__file__).resolve().parent / "results"


def run_select(config: Path, method: str, run_dir: Path, extra: tuple[str, ...] = ()) -> dict:
    """One cold `iss select` in a child process; wait4 gives that child's own peak RSS."""
    command = [sys.executable, "-m", "iss", "select", str(config), "--method", method,
               "--run-dir", str(run_dir), "--quiet", "--json", *extra]  # fmt: skip
    measured = run_measured(command, f"iss select --method {method}")
    stages = json.loads(measured.stdout)
    return {
        "method": method,
        "wall_seconds": measured.wall_seconds,
        "peak_rss_gib": measured.peak_rss_gib,
        "stage_seconds": {name: stage.get("seconds") for name, stage in stages.items()},
        "stages": stages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("configs/chemprot.yaml"))
    parser.add_argument("--methods", nargs="+", default=["iss", "tlm", "random"])
    args = parser.parse_args()
    task = load_config(args.config).task.name
    with tempfile.TemporaryDirectory() as scratch:
        rows = [run_select(args.config, method, Path(scratch) / method) for method in args.methods]
    lines = ["| method | wall s (cold run folder) | peak RSS GiB | docs selected | stage seconds |",
             "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for row in rows:
        selected = row["stages"][select_stage(row["method"])]
        stages = ", ".join(f"{name} {seconds}" for name, seconds in row["stage_seconds"].items())
        lines.append(
            f"| {row['method']} | {row['wall_seconds']} | {row['peak_rss_gib']} | {selected['docs']} | {stages} |"
        )
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    report = {"config": str(args.config), "task": task, "machine": machine, "runs": rows, "table": lines}
    (RESULTS / f"select_{task}.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
