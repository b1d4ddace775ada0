"""The run report (``iss report``): a run folder gathered into one self-contained HTML page (images inlined)
and a Markdown page with its PNGs beside it: config, results, what was selected from where, influence scores of
selected vs rejected candidates, the analysis plots and the time every stage took.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq
import yaml

from iss.comparison.tables import _cell, markdown_rows, results_rows, save_figure, verdict_title
from iss.comparison.verdict import TaskVerdict
from iss.config.io import recorded_config
from iss.errors import ConfigError
from iss.influence.scorer import InfluenceResult
from iss.retrieval.bm25 import pool_file
from iss.runs.folder import STAGE_FILE, RunFolder, read_json
from iss.selection.subset import read_subset_ids, subset_file, with_overlaps
from iss.stages.plan import RunPlan, influence_stage, select_stage

# ------------------------------------------------------------------------------------------ run report


@dataclass
class Section:
    """One part of the report, rendered the same way to HTML and Markdown."""

    title: str
    text: str = ""
    tables: list[tuple[str, list[dict]]] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)
    code: str = ""


HTML_TEMPLATE = jinja2.Template(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; }
th { background: #f0f0f0; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 1rem; overflow: auto; font-size: .8rem; }
figcaption, .caption { color: #555; font-size: .85rem; }
</style></head><body>
<h1>{{ title }}</h1>
<p class="caption">{{ subtitle }}</p>
{% for section in sections %}<section>
<h2>{{ section.title }}</h2>
{% if section.text %}<p>{{ section.text }}</p>{% endif %}
{% for caption, rows in section.tables %}<p class="caption">{{ caption }}</p>
<table><thead><tr>{% for key in rows[0] %}<th>{{ key }}</th>{% endfor %}</tr></thead><tbody>
{% for row in rows %}<tr>{% for key in rows[0] %}<td>{{ cell(row.get(key)) }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% endfor %}{% for caption, path in section.figures %}<figure><img alt="{{ caption }}" src="{{ inline(path) }}">
<figcaption>{{ caption }}</figcaption></figure>
{% endfor %}{% if section.code %}<pre>{{ section.code }}</pre>{% endif %}
</section>
{% endfor %}</body></html>
""",
    autoescape=True,
)


def write_report(run_dir: Path, out: Path | None = None) -> dict:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ PNGs) for a run folder; return a summary."""
    run_dir = Path(run_dir)
    run = RunFolder.existing(run_dir)
    manifest = run.read_manifest()
    for name in manifest.get("stages", {}):
        if (run_dir / name / STAGE_FILE).is_file() and (problems := run.damage(name)):
            raise ConfigError(
                f"stage {name} is damaged: {problems[0]} (in {run_dir / name}); rerun the run's command (`iss run "
                "CONFIG`), which recomputes it, before reporting"
            )
    out = Path(out) if out else run_dir / "report"
    if out.is_dir() and any(out.iterdir()) and not (out / "report.html").is_file():
        raise ConfigError(f"--out {out} is a folder that holds no report: give a new folder (it is replaced)")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stages = {name: run_dir / entry["path"] for name, entry in manifest["stages"].items()}
    sections = [
        _results_section(stages),
        _selection_section(manifest, stages, tmp),
        _scores_section(manifest, stages, tmp),
        *_analysis_sections(stages, tmp),
        _timings_section(manifest),
        Section("Config", code=yaml.safe_dump(manifest.get("config", {}), sort_keys=False)),
    ]
    sections = [section for section in sections if section.text or section.tables or section.figures or section.code]
    task = manifest.get("config", {}).get("task", {}).get("name", run_dir.name)
    title = f"ISS run report: {task}"
    subtitle = f"{run_dir.resolve()} · updated {manifest.get('updated_at', '?')} · written {_now()}"
    html = HTML_TEMPLATE.render(title=title, subtitle=subtitle, sections=sections, cell=_cell, inline=_data_uri)
    (tmp / "report.html").write_text(html, encoding="utf-8")
    (tmp / "report.md").write_text(_markdown(title, subtitle, sections, tmp), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {
        "html": str(out / "report.html"),
        "markdown": str(out / "report.md"),
        "sections": [section.title for section in sections],
        "figures": sum(len(section.figures) for section in sections),
    }


def _results_section(stages: dict[str, Path]) -> Section:
    path = stages.get("results", Path("-")) / "results.json"
    if not path.is_file():
        return Section("Results", text="No results yet: run `iss run` to pretrain, fine-tune and compare.")
    results = read_json(path, "the run's results", f"delete {path.parent} and rerun `iss run CONFIG`")
    tables = [("", results_rows(results["table"], with_seeds=True))]
    judged = [row for verdict in results.get("verdict", []) for row in TaskVerdict.from_json(verdict).rows()]
    if judged:
        tables.append((verdict_title(results["verdict"][0]["margin"]), judged))
    return Section("Results", text="Test F1 x100 at the best dev epoch, mean ± std over seeds.", tables=tables)


def _plan(manifest: dict) -> RunPlan:
    """The plan of the run the manifest records (its config), which names every stage the report reads."""
    return RunPlan(recorded_config(manifest.get("config") or {}))


def _subsets(manifest: dict, stages: dict[str, Path]) -> dict[str, str]:
    """Subset label (method and variant) -> its select stage, for the subsets of the run's plan that exist, and the
    configured method's own (an ``iss select --method X`` outside the plan)."""
    plan = _plan(manifest)
    labels = {run.select: run.method + run.tag for run in plan.subsets()}
    labels.setdefault(select_stage(plan.config.selection.method), plan.config.selection.method)
    return {label: name for name, label in labels.items() if name in stages and subset_file(stages[name]).exists()}


def _selection_section(manifest: dict, stages: dict[str, Path], folder: Path) -> Section:
    subsets = _subsets(manifest, stages)
    if not subsets:
        return Section("Selection")
    summaries = manifest["stages"]
    sizes = [
        {"method": label, **{k: summaries[name]["summary"].get(k) for k in ("docs", "tokens", "budget", "budget_met")}}
        for label, name in subsets.items()
    ]
    sizes = with_overlaps(sizes, [read_subset_ids(stages[name]) for name in subsets.values()])  # Jaccard, ISS, TLM
    pool = pool_file(stages.get("retrieval", Path("-")))
    tables = {label: subset_file(stages[name]) for label, name in subsets.items()}
    tables |= {"BM25 pool": pool} if pool.is_file() else {}
    counts = {
        name: Counter(pq.read_table(path, columns=["source"]).column("source").to_pylist())
        for name, path in tables.items()
    }
    sources = sorted({source for counter in counts.values() for source in counter}, key=str)
    shares = [
        {"source": str(source), **{name: f"{c[source] / max(sum(c.values()), 1):.1%}" for name, c in counts.items()}}
        for source in sources
    ]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(counts) + 1.5))
    left = np.zeros(len(counts))
    for source in sources:
        share = np.array([c[source] / max(sum(c.values()), 1) for c in counts.values()])
        ax.barh(list(counts), share, left=left, label=str(source))
        left += share
    ax.set_xlabel("share of documents")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))
    save_figure(fig, folder / "sources.png")
    return Section(
        "Selection",
        text="What each method selected and which corpus sources (domains) the documents came from.",
        tables=[("Subset sizes", sizes), ("Share of documents by source", shares)],
        figures=[("Sources of each subset and of the BM25 candidate pool", folder / "sources.png")],
    )


def _scores_section(manifest: dict, stages: dict[str, Path], folder: Path) -> Section:
    config = _plan(manifest).config.with_overrides({"selection.method": "iss"})
    influence, selected = stages.get(influence_stage(config.influence)), stages.get(select_stage("iss"))
    if not influence or not selected or not InfluenceResult.exists(influence):
        return Section("Influence scores")
    result = InfluenceResult.load(influence)
    best = result.best_scores()
    chosen = set(read_subset_ids(selected).tolist())
    is_selected = np.array([doc in chosen for doc in best])
    scores = np.array(list(best.values()))
    pool_docs = len(result.pool_units)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(scores, bins=50) if scores.size else 10
    ax.hist(scores[~is_selected], bins=bins, alpha=0.6, label=f"rejected ({(~is_selected).sum()})")
    ax.hist(scores[is_selected], bins=bins, alpha=0.6, label=f"selected ({is_selected.sum()})")
    ax.set_xlabel("best influence score over task units")
    ax.set_ylabel("candidates")
    ax.set_yscale("log")
    ax.legend()
    save_figure(fig, folder / "scores.png")
    stats = [
        {"group": name, "candidates": int(mask.sum()), **_quantiles(scores[mask])}
        for name, mask in (("selected", is_selected), ("rejected", ~is_selected))
    ]
    return Section(
        "Influence scores",
        text=(
            f"Each candidate's best score over the task units that ranked it. {len(best)} of {pool_docs} pool units "
            "made some unit's top-k; the rest have no kept score and are not shown."
        ),
        tables=[("Score quantiles", stats)],
        figures=[("Influence score of selected vs rejected candidates (log counts)", folder / "scores.png")],
    )


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if not values.size:
        return {}
    q = np.quantile(values, [0.1, 0.5, 0.9])
    return {"mean": float(values.mean()), "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2])}


def _analysis_sections(stages: dict[str, Path], folder: Path) -> list[Section]:
    """The `iss analyze` artifacts that exist: their tables and plots."""
    parts = [
        ("analysis-words", "words", "Task-influential words (Table 6)", "words.png"),
        ("analysis-tsne", "separation", "t-SNE of task features (Figure 4)", "tsne.png"),
        ("analysis-layers", "layers", "Influence layer ablation (Figure 3, Table 7)", "layers.png"),
    ]
    sections = []
    for stage, stem, title, image in parts:
        source = stages.get(stage)
        if source is None or not (source / image).is_file():
            continue
        numbers = json.loads((source / f"{stem}.json").read_text(encoding="utf-8"))
        if isinstance(numbers, dict):  # t-SNE: model -> silhouette of the labels
            numbers = [{"model": model, "label silhouette": value} for model, value in numbers.items()]
        shutil.copy(source / image, folder / image)
        sections.append(Section(title, tables=[("", numbers)], figures=[(title, folder / image)]))
    return sections


def _timings_section(manifest: dict) -> Section:
    rows = [
        {"stage": name, "seconds": entry["summary"].get("seconds"), "reused last time": entry.get("reused")}
        for name, entry in manifest["stages"].items()
    ]
    total = sum(row["seconds"] or 0 for row in rows)
    return Section("Timings", text=f"Wall time of each stage when it ran; {total:.0f} s in all.", tables=[("", rows)])


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _markdown(title: str, subtitle: str, sections: list[Section], folder: Path) -> str:
    lines = [f"# {title}", "", subtitle, ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.text:
            lines += [section.text, ""]
        for caption, rows in section.tables:
            lines += ([f"*{caption}*", ""] if caption else []) + [markdown_rows(rows)]
        for caption, path in section.figures:
            lines += [f"![{caption}]({Path(path).relative_to(folder)})", ""]
        if section.code:
            lines += ["```yaml", section.code.rstrip(), "```", ""]
    return "\n".join(lines)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
