"""How long the test suite takes here: the README's figure.

Usage: python benchmarks/bench_suite.py [pytest arguments]

Runs ``python -m pytest -q`` (plus any arguments) in a child process (wall time and peak RSS via wait4), reads
pytest's summary line (passed, failed, skipped) and writes benchmarks/results/suite.json. Run it on idle cores.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path

from measure import run_measured

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def outcome_counts(summary: str) -> dict[str, int]:
    """``12 passed, 1 skipped, 3 warnings in 5.0s`` -> {"passed": 12, "skipped": 1, "warnings": 3}."""
    return {word: int(count) for count, word in re.findall(r"(\d+) (\w+)", summary.split(" in ")[0])}


def main() -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sys.argv[1:]]
    os.chdir(REPO)
    measured = run_measured(command, "the test suite")
    summary = [line for line in measured.stdout.splitlines() if line.strip()][-1].strip("= ")
    result = {
        "command": " ".join(["python", *command[1:]]),
        "summary": summary,
        **outcome_counts(summary),
        "wall_seconds": measured.wall_seconds,
        "peak_rss_gib": measured.peak_rss_gib,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "suite.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
