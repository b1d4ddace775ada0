"""The results as files: tables in the paper's layout (Table 3: mean and std over seeds of the test score
at the best dev epoch), the paired differences with their verdict, the mechanism check, the subsets, and figures.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np

from iss.comparison.stats import paired_difference, sample_std, seed_unit
from iss.comparison.verdict import DEFAULT_FAMILY, verdicts
from iss.selection.methods import COMPARISONS, display_name


def results_table(rows: list[dict]) -> list[dict]:
    """One line per method: mean/std test F1 per task (x100), their average, subset docs and FLOPs.

    ``rows`` are single runs with keys method, task, seed, test, subset_docs, flops, and optionally budget (a
    subset-size sweep gives one line per method and budget).
    """
    tasks = sorted({row["task"] for row in rows})
    lines = []
    for method, budget in dict.fromkeys((row["method"], row.get("budget", "")) for row in rows):
        mine = [row for row in rows if row["method"] == method and row.get("budget", "") == budget]
        name = display_name(method)
        line: dict = {
            "method": f"{name} ({budget})" if budget else name,
            "data_docs": int(np.mean([row["subset_docs"] for row in mine])),
            "flops": float(np.mean([row["flops"] for row in mine])),
        }
        means = []
        for task in tasks:
            scores = np.array([row["test"] for row in mine if row["task"] == task], dtype=float) * 100
            if scores.size:
                line[task] = {"mean": float(scores.mean()), "std": sample_std(scores), "seeds": scores.size}
                means.append(scores.mean())
        line["average"] = float(np.mean(means)) if means else float("nan")
        lines.append(line)
    return lines


def results_rows(table: list[dict], with_seeds: bool = False) -> list[dict]:
    """The table as display rows: Method, Data size, FLOPs, "mean ± std" per task (with the seed count), Avg."""
    tasks = [key for key in table[0] if key not in ("method", "data_docs", "flops", "average")] if table else []
    rows = []
    for line in table:
        row = {
            "Method": line["method"],
            "Data size (docs)": line["data_docs"],
            "FLOPs": f"{line['flops']:.2e}" if line["flops"] else "0",
        }
        for task in tasks:
            cell = line.get(task)
            seeds = f" (n={cell['seeds']})" if cell and with_seeds else ""
            row[task] = f"{cell['mean']:.2f} ± {cell['std']:.2f}{seeds}" if cell else "—"
        rows.append({**row, "Avg.": f"{line['average']:.2f}"})
    return rows


def markdown(table: list[dict]) -> str:
    return markdown_rows(results_rows(table))


def differences_rows(
    rows: list[dict],
    value: Callable[[dict], float] = lambda row: 100 * row["test"],
    unit: Callable[[dict], int] = seed_unit,
    unit_name: str = "seed",
    digits: int = 2,
) -> list[dict]:
    """Paired differences per task and budget for :data:`COMPARISONS`, with 95% t-intervals over units.

    By default of test F1 (x100) over pretraining seeds, each the mean of the fine-tuning seeds run on it
    (:mod:`iss.stats`); :func:`mechanism_differences` pairs mechanism-check repeats instead.
    """
    scores: dict[tuple, dict[int, list[float]]] = {}
    for row in rows:
        key = (row.get("task", ""), row.get("budget", ""), row["method"])
        scores.setdefault(key, {}).setdefault(unit(row), []).append(value(row))
    lines = []
    for task, budget in dict.fromkeys((row.get("task", ""), row.get("budget", "")) for row in rows):
        for first, second, meaning in COMPARISONS:
            a, b = scores.get((task, budget, first)), scores.get((task, budget, second))
            if not a or not b:
                continue
            diff = paired_difference(a, b)
            lines.append(
                {
                    **({"task": task} if task else {}),
                    **({"budget": budget} if budget else {}),
                    "comparison": f"{first} - {second}",
                    "meaning": meaning,
                    "mean": round(diff.mean, digits),
                    "ci95_low": round(diff.low, digits),
                    "ci95_high": round(diff.high, digits),
                    "std": round(diff.std, digits),
                    f"{unit_name}s": diff.n,
                    "verdict": diff.verdict,
                }
            )
    return lines


def mechanism_differences(rows: list[dict]) -> list[dict]:
    """Paired differences of the mechanism check over its repeats, as the test task loss the first subset takes
    off relative to the second (loss of second - loss of first: > 0 when the first lowers it more, so every
    comparison reads like the F1 ones). Empty unless the check was repeated."""
    repeated = [row for row in rows if "repeat" in row and row["method"] != "none"]
    if not repeated:
        return []
    return differences_rows(
        repeated, value=lambda row: -row["test_task_loss"], unit=lambda row: row["repeat"], unit_name="repeat", digits=4
    )


def mechanism_summary(rows: list[dict]) -> list[dict]:
    """The repeated mechanism check per method: mean ± std of the test task loss and test F1 over its repeats."""
    lines = []
    for method, task in dict.fromkeys((row["method"], row.get("task", "")) for row in rows):
        mine = [row for row in rows if row["method"] == method and row.get("task", "") == task]
        loss, f1 = (np.array([row[key] for row in mine], dtype=float) for key in ("test_task_loss", "test_f1"))
        lines.append(
            {
                "method": method,
                **({"task": task} if task else {}),
                "repeats": len(mine),
                "test_task_loss": f"{loss.mean():.4f} ± {sample_std(loss):.4f}",
                "test_f1": f"{f1.mean():.3f} ± {sample_std(f1):.3f}",
            }
        )
    return lines


def precise_losses(rows: list[dict]) -> list[dict]:
    """Losses shown to 4 decimals: subsets move the mechanism check's task loss in the third decimal."""
    return [
        {k: f"{v:.4f}" if k.endswith("loss") and isinstance(v, float) else v for k, v in row.items()} for row in rows
    ]


DIFFERENCES_TITLE = (
    "Paired differences of test F1 (x100): mean over pretraining seeds (fine-tuning seeds averaged within one), "
    "95% t-interval"
)


def write_results(
    rows: list[dict],
    folder: Path,
    mechanism: list[dict] | None = None,
    subsets: list[dict] | None = None,
    margin: float = 1.0,
    family: list[tuple[str, str]] | tuple[tuple[str, str], ...] = DEFAULT_FAMILY,
) -> list[dict]:
    """results.md (scores, the verdict, paired differences, subsets, mechanism check), results.csv (one line per
    run) and results.json (runs, the aggregated table, the verdict per task and the other tables)."""
    table = results_table(rows)
    differences = differences_rows(rows)
    judged = verdicts(rows, margin, family)
    sections = [markdown(table)]
    for title, extra in (
        (verdict_title(margin), [row for verdict in judged for row in verdict.rows()]),
        (DIFFERENCES_TITLE, differences),
        ("Subsets", subsets),
        *mechanism_sections(mechanism or []),
    ):
        if extra:
            sections.append(f"\n### {title}\n\n{markdown_rows(extra)}")
    (folder / "results.md").write_text("".join(sections), encoding="utf-8")
    with (folder / "results.csv").open("w", newline="", encoding="utf-8") as handle:
        fields = ["method", "budget", "task", "pretrain_seed", "seed", "dev", "test", "subset_docs", "flops"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in fields})
    extras = {"verdict": [verdict.to_json() for verdict in judged], "differences": differences}
    extras |= {"subsets": subsets or [], "mechanism": mechanism or []}
    extras["mechanism_differences"] = mechanism_differences(mechanism or [])
    (folder / "results.json").write_text(
        json.dumps({"runs": rows, "table": table, **extras}, indent=2), encoding="utf-8"
    )
    return table


def verdict_title(margin: float) -> str:
    return (
        f"Verdict: positive control (TLM - random corpus, passed above +{margin:g}), then each comparison with its "
        "Holm-adjusted interval (level per step) over pretraining seeds"
    )


def mechanism_sections(
    rows: list[dict],
    title: str = "Mechanism check: warmed-up model + MLM on the subset, task head scored without fine-tuning",
) -> list[tuple[str, list[dict]]]:
    """The mechanism check's tables (title, rows): each check as it is, or, repeated, mean ± std per method and
    the paired differences over repeats."""
    if not any("repeat" in row for row in rows):
        return [(title, precise_losses(rows))]
    return [
        (f"{title} (mean ± std over repeats)", mechanism_summary(rows)),
        (
            f"{title}: loss of the second - loss of the first (> 0: the first lowers the test task loss more), "
            "paired over repeats, 95% t-interval",
            mechanism_differences(rows),
        ),
    ]


# ------------------------------------------------------------------------------------------ plots, rows


def save_figure(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def markdown_rows(rows: list[dict]) -> str:
    """A Markdown table of flat dict rows (floats to 3 significant digits)."""
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_rows(rows: list[dict], stem: Path) -> None:
    """The numbers behind a plot as CSV, JSON and a Markdown table (for the report and for scripts)."""
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    with stem.with_suffix(".csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".md").write_text(markdown_rows(rows), encoding="utf-8")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "—" if np.isnan(value) else f"{value:.3g}"
    return "" if value is None else str(value)
