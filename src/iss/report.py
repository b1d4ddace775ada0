"""Results tables in the paper's layout (Table 3): method, data size, FLOPs, F1 per task, average.

Each cell is the mean and standard deviation over seeds of the test score at the best dev epoch.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

METHOD_NAMES = {"none": "no pretraining", "random": "random", "tlm": "TLM (BM25)", "iss": "ISS"}


def results_table(rows: list[dict]) -> list[dict]:
    """One line per method: mean/std test F1 per task (x100), their average, subset docs and FLOPs.

    ``rows`` are single runs with keys method, task, seed, test, subset_docs, flops, and optionally budget (a
    subset-size sweep gives one line per method and budget).
    """
    tasks = sorted({row["task"] for row in rows})
    lines = []
    for method, budget in dict.fromkeys((row["method"], row.get("budget", "")) for row in rows):
        mine = [row for row in rows if row["method"] == method and row.get("budget", "") == budget]
        name = METHOD_NAMES.get(method, method)
        line: dict = {
            "method": f"{name} ({budget})" if budget else name,
            "data_docs": int(np.mean([row["subset_docs"] for row in mine])),
            "flops": float(np.mean([row["flops"] for row in mine])),
        }
        means = []
        for task in tasks:
            scores = np.array([row["test"] for row in mine if row["task"] == task], dtype=float) * 100
            if scores.size:
                line[task] = {"mean": float(scores.mean()), "std": float(scores.std()), "seeds": scores.size}
                means.append(scores.mean())
        line["average"] = float(np.mean(means)) if means else float("nan")
        lines.append(line)
    return lines


def markdown(table: list[dict]) -> str:
    tasks = [key for key in table[0] if key not in ("method", "data_docs", "flops", "average")] if table else []
    header = ["Method", "Data size (docs)", "FLOPs", *tasks, "Avg."]
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for line in table:
        cells = [line["method"], str(line["data_docs"]), f"{line['flops']:.2e}" if line["flops"] else "0"]
        for task in tasks:
            cell = line.get(task)
            cells.append(f"{cell['mean']:.2f} ± {cell['std']:.2f}" if cell else "—")
        cells.append(f"{line['average']:.2f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_results(rows: list[dict], folder: Path) -> list[dict]:
    """results.md, results.csv (one line per run) and results.json (runs and the aggregated table)."""
    table = results_table(rows)
    (folder / "results.md").write_text(markdown(table), encoding="utf-8")
    with (folder / "results.csv").open("w", newline="", encoding="utf-8") as handle:
        fields = ["method", "budget", "task", "seed", "dev", "test", "subset_docs", "flops"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in fields})
    (folder / "results.json").write_text(json.dumps({"runs": rows, "table": table}, indent=2), encoding="utf-8")
    return table
