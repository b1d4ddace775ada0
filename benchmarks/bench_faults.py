"""Every fault case of tests/test_faults.py with its outcome and time, and what a refusal costs a user.

Usage: python benchmarks/bench_faults.py [--with-slow]

Runs ``pytest tests/test_faults.py`` (the kill -9 test only with ``--with-slow``) with a JUnit report, and lists
each case (test and parameter) with its outcome and seconds; then times two refusals as a user meets them, the
whole ``iss`` process from start to its one line (interpreter and imports included), since the suite runs the CLI
in-process. Writes benchmarks/results/faults.{json,md}.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from measure import run_measured

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
# what a user types that must end in one line and exit 2: (name, YAML config)
REFUSALS = [("empty config", ""), ("corpus: 5", "corpus: 5\n")]


def cases(report: Path) -> list[dict]:
    """One row per test case of the JUnit report: its name, outcome and seconds."""
    rows = []
    for case in ElementTree.parse(report).iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        rows.append({"case": case.get("name"), "outcome": outcome, "seconds": round(float(case.get("time")), 3)})
    return rows


def refusal_seconds(folder: Path) -> list[dict]:
    """Wall seconds of ``iss select CONFIG`` from process start to its one-line refusal (exit 2)."""
    rows = []
    for name, text in REFUSALS:
        config = folder / f"{len(rows)}.yaml"
        config.write_text(text, encoding="utf-8")
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "iss", "select", str(config), "--run-dir", str(folder / "run"), "--quiet"],
            capture_output=True,
            text=True,
        )
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        rows.append(
            {
                "input": name,
                "exit_code": done.returncode,
                "lines": len(lines),
                "said": lines[0] if lines else "",
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    return rows


def markdown(result: dict) -> str:
    lines = [
        "# Fault cases",
        "",
        f"`{result['command']}`: {result['passed']} of {len(result['cases'])} cases passed, "
        f"{result['wall_seconds']} s wall ({result['machine']['cpus']} CPUs).",
        "",
        "| case | outcome | seconds |",
        "| --- | --- | --- |",
        *(f"| `{row['case']}` | {row['outcome']} | {row['seconds']} |" for row in result["cases"]),
        "",
        "A refusal as a user meets it (a fresh `iss` process, start to its one line):",
        "",
        "| input | exit code | lines | seconds |",
        "| --- | --- | --- | --- |",
        *(f"| {row['input']} | {row['exit_code']} | {row['lines']} | {row['seconds']} |" for row in result["refusals"]),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    os.chdir(REPO)
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "junit.xml"
        selection = [] if "--with-slow" in sys.argv else ["-m", "not slow"]
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_faults.py",
                   *selection, f"--junitxml={report}"]  # fmt: skip
        measured = run_measured(command, "the fault suite")
        rows = cases(report)
        refusals = refusal_seconds(Path(scratch))
    result = {
        "command": " ".join(["python", *command[1:-1]]),
        "cases": rows,
        "passed": sum(row["outcome"] == "passed" for row in rows),
        "wall_seconds": measured.wall_seconds,
        "refusals": refusals,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "faults.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
