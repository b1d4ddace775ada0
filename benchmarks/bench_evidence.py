"""Evidence: does the subset matter here, and does ISS beat BM25 (TLM) and random where it does?

Usage: python benchmarks/bench_evidence.py [--settings further scratch] [--tasks acl_arc scierc chemprot]
                                           [--runs-root runs/evidence] [--force] [--output evidence]

For each setting (``further``: further pretraining of the shared all-MiniLM-L6-v2 encoder, configs/further/;
``scratch``: a tiny BERT from scratch with TLM's joint objective, configs/scratch/) and task, runs ``iss run CONFIG`` in
a child process (wall time and peak RSS via wait4) with the methods iss (dot), iss-cosine, tlm, random,
random-corpus (positive control), iss-bottom (negative control) and none, the mechanism check and 5 seeds,
then merges its results into benchmarks/results/evidence.{json,md} (``--output``: other names; the causal-LM
runs of ``configs/causal/`` go to ``--settings causal --output evidence --output causal_chemprot``). Each
(setting, task) is committed to the JSON as it finishes; a rerun skips those already there (``--force`` reruns
them; finished stages in the run folder are reused either way).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from measure import run_measured
from scipy import stats

from iss.comparison.tables import markdown, markdown_rows, mechanism_sections, precise_losses, results_table
from iss.comparison.verdict import seeds_for_power, verdicts
from iss.config.io import load_config, recorded_config
from iss.config.schema import IssConfig
from iss.pipeline.estimate import ESTIMATE_FILE, FORECAST_FILE, RunEstimate
from iss.pipeline.run import Pipeline
from iss.retrieval.bm25 import pool_file
from iss.selection.subset import source_shares, subset_file
from iss.stages.plan import RunPlan, select_stage

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SETTINGS = {
    "further": CONFIGS / "further",
    "scratch": CONFIGS / "scratch",
    "gate": CONFIGS / "gate",
    "causal": CONFIGS / "causal",
    "search": CONFIGS / "search",
}
GATE_MARGIN = 1.0  # a regime passes when TLM - random corpus has its 95 % t-interval above this many F1 points
RESERVED_SEEDS = set(range(40, 60))  # pretraining seeds kept for replications: never used by an entry
INTERVALS = (
    "95 % Student t-interval (scipy) over pretraining seeds, each the mean of its fine-tuning seeds; paired by seed "
    "id; std with ddof = 1"
)
POOL = "pool (BM25)"  # the BM25 candidate pool's name in the sources and overlap tables


def run_one(
    setting: str, task: str, runs_root: Path, variant: str | None = None, overrides: dict | None = None
) -> dict:
    """`iss run` of one (setting, task) in a child process; its results.json plus wall time and peak RSS.

    A variant (a label and config overrides) runs in a folder of its own that links the base run's finished
    stages in (``iss run --reuse-from``), so only the stages its overrides reach are computed;
    ``new_stage_seconds`` is their cost (stages whose files are not the base run's). A run that must continue on
    another machine travels as one ``iss export`` archive, taken in there with ``iss import``.
    """
    base_dir = run_dir = runs_root / setting / task
    config = SETTINGS[setting] / f"{task}.yaml"
    command = [sys.executable, "-m", "iss", "run", str(config), "--quiet"]
    if variant:
        run_dir = variant_dir(base_dir, variant)
        command += ["--reuse-from", str(base_dir)]
    command += ["--run-dir", str(run_dir)]
    for key, value in (overrides or {}).items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    measured = run_measured(command, f"iss run {config}")
    results = json.loads((run_dir / "results" / "results.json").read_text(encoding="utf-8"))
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    seconds = {name: stage.get("summary", {}).get("seconds") or 0 for name, stage in manifest["stages"].items()}
    entry = {
        "setting": setting,
        "task": task,
        "config": str(config.relative_to(CONFIGS.parent)),
        "wall_seconds": measured.wall_seconds,
        "peak_rss_gib": measured.peak_rss_gib,
        "stage_seconds_total": round(sum(seconds.values()), 1),
    }
    if variant:
        own = [
            name for name in seconds if not _same_file(run_dir / name / "stage.json", base_dir / name / "stage.json")
        ]
        entry |= {
            "variant": variant,
            "overrides": overrides,
            "new_stage_seconds": round(sum(seconds[n] for n in own), 1),
        }
    plan = manifest_plan(manifest)
    pretrained = [seconds[name] for name in plan.pretrainings() if name in seconds]
    tuned = [seconds[run.finetune] for run in plan.runs if run.finetune in seconds]
    entry["seconds_per_stage"] = {
        "pretraining": round(sum(pretrained) / max(1, len(pretrained)), 1),
        "fine-tuning": round(sum(tuned) / max(1, len(tuned)), 1),
        "mlm-head": seconds.get("mlm-head", 0),
    }
    return {
        **entry,
        **design(results["runs"], results["differences"]),
        "pretraining": pretraining_rows(manifest),
        "sources": source_rows(run_dir, results.get("subsets", [])),
        "overlap": overlap_rows(run_dir, results.get("subsets", [])),
        "best_epochs": best_epochs(manifest, [run.finetune for run in manifest_plan(manifest).runs]),
        **estimate_rows(run_dir, manifest),
        **mlm_head(manifest),
        **results,
    }


def manifest_plan(manifest: dict) -> RunPlan:
    """The run plan of the config a run folder's manifest records: the names of its stages."""
    return RunPlan(recorded_config(manifest["config"]))


def design(runs: list[dict], differences: list[dict]) -> dict:
    """How an entry's intervals were made (its seeds, the interval method) and whether its positive control passed:
    TLM - random corpus with the whole 95 % interval above ``GATE_MARGIN`` (:mod:`iss.compare`, the code `iss run`
    reads its verdict with). No comparison is read without it."""
    del differences  # the control is made again from the runs by iss.compare (a test checks both agree)
    judged = verdicts(runs, GATE_MARGIN)
    return {
        "seeds": {
            "pretraining": sorted({run["pretrain_seed"] for run in runs if run.get("pretrain_seed") is not None}),
            "finetuning": sorted({run["seed"] for run in runs}),
        },
        "intervals": INTERVALS,
        "positive_control": {
            "comparison": "tlm - random-corpus",
            "margin": GATE_MARGIN,
            "passed": bool(judged) and all(verdict.control_passed for verdict in judged),
        },
    }


def refuse_reserved(seeds: list[int], where: str) -> None:
    """Pretraining seeds 40-59 are kept for replications: an entry that uses one is refused before it runs."""
    reserved = sorted(set(seeds) & RESERVED_SEEDS)
    if reserved:
        raise SystemExit(f"{where}: seeds {reserved} are reserved for replication (40-59); use others")


def check_against_plan(entry: dict, plan: IssConfig) -> None:
    """A confirmatory entry must be the run its plan fixed: the same pretraining seeds, none reserved."""
    planned = sorted({p for p, _ in plan.seed_pairs()})
    refuse_reserved(planned, "the plan")
    if entry["seeds"]["pretraining"] != planned:
        raise SystemExit(f"entry seeds {entry['seeds']['pretraining']} differ from its plan's {planned}: refused")


def mlm_head(manifest: dict) -> dict:
    """The fitted MLM head's record (``model.mlm_head_steps``), if the run fitted one."""
    stage = manifest["stages"].get("mlm-head")
    if stage is None:
        return {}
    summary = stage["summary"]
    return {"mlm_head": {k: summary.get(k) for k in ("steps", "mlm", "sample_docs", "seconds", "curve")}}


def estimate_rows(run_dir: Path, manifest: dict) -> dict:
    """What `iss run` estimated before any stage and once the pool existed, per kind of stage, against what the
    stages took (seconds), the calibration factors it applied and its probes' prices; nothing for a folder without
    estimates."""
    plan = manifest_plan(manifest)
    paths = [run_dir / FORECAST_FILE, run_dir / ESTIMATE_FILE]
    if not all(path.is_file() for path in paths):
        return {}
    forecast, with_pool = (RunEstimate.load(path) for path in paths)
    rows = with_pool.against_with_forecast(forecast, manifest, plan)
    return {"estimate_seconds": rows, "probe_seconds_per_token": with_pool.seconds_per_token}


def best_epochs(manifest: dict, finetunes: list[str]) -> dict:
    """How many of the fine-tuning runs (stage names) peaked at each epoch: runs that peak at the last epoch were
    still learning, so the table measures how fast a model starts to learn more than what pretraining gave it."""
    epochs = manifest["config"]["finetune"]["epochs"]
    counts = Counter(manifest["stages"][name]["summary"]["best_epoch"] for name in finetunes)
    return {"epochs": epochs, "runs": sum(counts.values()), "at_last_epoch": counts[epochs], "counts": counts}


def refresh(entry: dict, run_dir: Path) -> dict:
    """The entry with the tables read from its run folder (best epochs, sources, overlap) made again, without running
    anything: an entry recorded before a table existed gains it. Refused unless every run of the entry is a
    fine-tuning stage of that folder with the same test F1 (a folder partly recomputed since is still fine as long
    as its fine-tunes are the entry's)."""
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    plan = manifest_plan(manifest)
    grid = plan.config.evaluation.pretrain_seeds is not None  # else a fine-tune is named by its own seed alone
    names = {(run.method, run.pretrain_seed if grid else None, run.seed): run.finetune for run in plan.runs}
    finetunes = []
    for run in entry["runs"]:
        key = (run["method"], run.get("pretrain_seed") if grid else None, run["seed"])
        name = names.get(key, f"{run['method']} seed {run['seed']}")
        if manifest["stages"].get(name, {}).get("summary", {}).get("test") != run["test"]:
            raise SystemExit(f"{run_dir}: stage {name} is not the entry's run (test F1 differs or missing)")
        finetunes.append(name)
    tables = {
        "sources": source_rows(run_dir, entry["subsets"]),
        "overlap": overlap_rows(run_dir, entry["subsets"]),
        "best_epochs": best_epochs(manifest, finetunes),
    }
    return {**entry, **tables, **estimate_rows(run_dir, manifest), **mlm_head(manifest)}


def source_rows(run_dir: Path, subsets: list[dict], shown: int = 4) -> list[dict]:
    """Where the BM25 pool and each subset come from (shares of the corpus's sources, the largest ``shown`` and
    the rest): the positive control can only pass if the pool is more in-domain than a random sample."""
    rows = []
    for name, parquet in subset_files(run_dir, subsets).items():
        sources = _column(parquet, "source")
        top = list(source_shares(sources).items())[:shown]
        mix = [f"{source} {share:.0%}" for source, share in top]
        mix.append(f"other {1 - sum(share for _, share in top):.0%}")
        rows.append({"subset": name, "docs": len(sources), "sources": ", ".join(mix)})
    return rows


def overlap_rows(run_dir: Path, subsets: list[dict]) -> list[dict]:
    """Documents shared by each pair of subsets drawn from the BM25 pool, next to what two uniform random draws of
    those sizes would share (a * b / pool): a top that shares more than chance with its own bottom does not
    separate the documents the negative control compares, and two methods sharing many are not separate subsets."""
    files = subset_files(run_dir, subsets)
    pool = files.pop(POOL, None)
    if pool is None:
        return []
    pool_ids = set(_column(pool, "corpus_id"))
    chosen = {name: ids for name, path in files.items() if (ids := set(_column(path, "corpus_id"))) <= pool_ids}
    names = list(chosen)  # the random corpus sample is left out above: it is not drawn from the pool
    return [
        {
            "subsets": f"{a} & {b}",
            "shared": len(chosen[a] & chosen[b]),
            "by_chance": round(len(chosen[a]) * len(chosen[b]) / len(pool_ids)),
        }
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]


def subset_files(run_dir: Path, subsets: list[dict]) -> dict[str, Path]:
    """The BM25 pool's file (named ``POOL``) and each method's selected subset file that the run folder holds."""
    files = {POOL: pool_file(run_dir / "retrieval")}
    files |= {row["method"]: subset_file(run_dir / select_stage(row["method"])) for row in subsets}
    return {name: path for name, path in files.items() if path.exists()}


def _column(parquet: Path, name: str) -> list:
    return pq.read_table(parquet, columns=[name]).column(name).to_pylist()


def _same_file(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.samefile(b)


def plan_commit(plan: Path) -> str:
    """The commit that last changed the plan file: the plan must be committed before the run it governs."""
    found = subprocess.run(["git", "log", "-1", "--format=%H", "--", str(plan)], capture_output=True, text=True)
    if not found.stdout.strip():
        raise SystemExit(f"{plan}: not committed; a plan is committed before the first stage of its run")
    return found.stdout.strip()


def run_command(entry: dict) -> str:
    """The shell command that makes an entry's runs: its config, and a variant's overrides quoted so that a list
    (``finetune.seeds=[0, 1, 2]``) stays one argument."""
    overrides = (entry.get("overrides") or {}) if entry.get("variant") else {}
    return f"iss run {entry['config']}" + "".join(f" --set {shlex.quote(f'{k}={v}')}" for k, v in overrides.items())


def variant_dir(run_dir: Path, label: str) -> Path:
    """The run folder of a variant: the base folder's name, ``@`` and the label made path-safe."""
    slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
    return run_dir.with_name(f"{run_dir.name}@{slug}")


def pretraining_rows(manifest: dict) -> list[dict]:
    """Per pretrained subset: the MLM loss at the end (and its curve) against the subset's unigram level (the loss
    of a model that knows word frequencies only, which the pretrain stage records); a curve that stays above it
    has learned little."""
    plan = manifest_plan(manifest)
    rows = []
    for name in plan.pretrainings():
        run, summary = plan.subset_of(name), manifest["stages"][name]["summary"]
        rows.append(
            {
                "subset": run.method + run.tag,
                "steps": summary["steps"],
                "final_mlm": summary.get("mlm"),
                "final_task_mlm": summary.get("task_mlm"),
                "unigram_level": summary.get("unigram_mlm_level"),
                "curve": summary.get("curve"),
            }
        )
    return rows


def mechanism_pass(config: IssConfig, budget: str | None = None, tag: str = "") -> list[dict]:
    """Selection and the mechanism check only (no pretraining or fine-tuning) for every configured method, one
    row per check (with ``evaluation.mechanism_repeats`` > 1, one per repeat)."""
    pipeline = Pipeline(config, show_progress=False)
    rows = []
    for name in config.evaluation.methods:
        variant = pipeline.method_variant(name, budget, tag)
        selected = variant.select().summary if name != "none" else {}
        for check in variant.mechanism_rows(pretrained=name != "none"):
            rows.append(
                {
                    "method": name,
                    **{k: v for k, v in check.items() if k == "repeat"},
                    "docs": selected.get("docs", 0),
                    "mean_tokens": selected.get("mean_tokens"),
                    **{k: v for k, v in check.items() if k.startswith(("test_", "dev_"))},
                }
            )
    return rows


def base_config(setting: str, task: str, runs_root: Path) -> IssConfig:
    """The (setting, task) config as it is now, on its base run folder."""
    return load_config(SETTINGS[setting] / f"{task}.yaml").with_overrides({"run_dir": str(runs_root / setting / task)})


def token_budget_mechanism(config: IssConfig, docs_entry: dict) -> dict:
    """The mechanism check again at an equal-token budget (the equal-document subsets differ in length).

    The budget is the mean token count of the equal-document subsets, so both comparisons buy the same amount of
    text on average; retrieval, warm-up and influence are reused from the run folder.
    """
    tokens = int(sum(row["tokens"] for row in docs_entry["subsets"]) / len(docs_entry["subsets"]))
    return {"budget_tokens": tokens, "mechanism": mechanism_pass(config, f"{tokens} tokens", "@tokens")}


def mechanism_again(setting: str, task: str, runs_root: Path, entry: dict) -> dict:
    """The entry with its mechanism check (equal documents and equal tokens) made again from the config as it is
    now, in its run folder: raising ``evaluation.mechanism_repeats`` computes the new repeats only."""
    config = base_config(setting, task, runs_root)
    start = time.perf_counter()
    docs = mechanism_pass(config)
    tokens = token_budget_mechanism(config, entry)
    repeats = {"repeats": config.evaluation.mechanism_repeats, "seconds": round(time.perf_counter() - start, 1)}
    return {**entry, "mechanism": docs, "equal_tokens": tokens, "mechanism_repeats": repeats}


def mechanism_variant(setting: str, task: str, runs_root: Path, label: str, overrides: dict) -> dict:
    """The mechanism check under changed settings (e.g. a stronger warm-up), in a run folder of its own."""
    run_dir = variant_dir(runs_root / setting / task, label)
    config = load_config(SETTINGS[setting] / f"{task}.yaml").with_overrides({**overrides, "run_dir": str(run_dir)})
    start = time.perf_counter()
    rows = mechanism_pass(config)
    warmup = Pipeline(config, show_progress=False).warmup().summary
    return {
        "label": label,
        "overrides": overrides,
        "warmup": {k: v for k, v in warmup.items() if k != "seconds"},
        "seconds": round(time.perf_counter() - start, 1),
        "mechanism": rows,
    }


SUMMARY = {  # comparison in an entry's differences -> column of the summary table
    "tlm - random-corpus": "positive control: TLM - random corpus",
    "iss - tlm": "ISS - TLM",
    "iss - random": "ISS - random (pool)",
    "iss - iss-bottom": "negative control: ISS - bottom",
    "iss-cosine - iss": "cosine - dot ISS",
}
SETTING_TITLES = {
    "further": "further pretraining of all-MiniLM-L6-v2",
    "scratch": "from scratch (TLM objective)",
    "gate": "gate regime (TLM, random corpus and none only)",
    "causal": "continued pretraining of SmolLM2-135M (causal LM)",
    "search": "regime search (issue 41; TLM, random corpus and none only)",
}


def summary_rows(entries: list[dict]) -> list[dict]:
    """One row per entry with its controls' and ISS's paired differences, mean [95% CI] and the verdict where the
    interval excludes zero: every regime's answer at a glance, before the sections that back it."""
    rows = []
    for entry in sorted(entries, key=lambda e: (e["setting"], e["task"], e.get("variant") or "")):
        if "stopped" in entry:
            continue
        found = {row["comparison"]: row for row in entry.get("differences", [])}
        row = {"task": entry["task"], "setting": entry["setting"], "variant": entry.get("variant") or ""}
        control = entry.get("positive_control")
        row["control passed"] = (
            "superseded"
            if "superseded" in entry
            else {True: "yes", False: "no", None: ""}[control and control["passed"]]
        )
        for comparison, column in SUMMARY.items():
            if (cell := found.get(comparison)) is not None:
                verdict = "" if cell["verdict"] == "tie" else f" {cell['verdict']}"
                row[column] = f"{cell['mean']:+.2f} [{cell['ci95_low']:.2f}, {cell['ci95_high']:.2f}]{verdict}"
            else:
                row[column] = ""
        best = entry.get("best_epochs")
        row["runs at the last epoch"] = f"{best['at_last_epoch']} of {best['runs']}" if best else ""
        rows.append(row)
    return rows


SEARCH_BUDGET_SECONDS = 3 * 86_400  # the rule's "a few days of CPU": 3 days of this machine
FAMILY_PRETRAININGS, FAMILY_FINETUNES = 7, 8  # per seed: TLM, random corpus, ISS, cosine, random, bottom, DSIR, kNN


def search_rows(entries: list[dict]) -> list[dict]:
    """The regime search read by its rule (docs/evidence.md): per candidate, the control's mean and sd over its
    seeds, the conservative effect (one-sided 80 % lower bound), the seeds that give 80 % power to clear the margin
    there, and what the confirmatory run would cost on this machine; eligible when that fits 3 days."""
    rows = []
    for entry in entries:
        if entry["setting"] != "search" or "runs" not in entry:
            continue
        (verdict,) = verdicts(entry["runs"], GATE_MARGIN)
        control = verdict.control
        n = len(control.units)
        conservative = control.mean - stats.t.ppf(0.8, n - 1) * control.std / math.sqrt(n)
        seeds = seeds_for_power(conservative, control.std, GATE_MARGIN)
        stage = entry["seconds_per_stage"]
        per_seed = FAMILY_PRETRAININGS * stage["pretraining"] + FAMILY_FINETUNES * stage["fine-tuning"]
        cost = seeds * per_seed + stage["mlm-head"] if seeds else None
        rows.append(
            {
                "candidate": f"{entry['task']}: {entry.get('variant') or 'probe'}",  # the config, then the reading
                "seeds": n,
                "TLM - random corpus": f"{control.mean:+.2f} [{control.low:.2f}, {control.high:.2f}]",
                "sd": round(control.std, 2),
                "conservative effect": round(conservative, 2),
                "seeds for 80 % power": seeds
                or ("none: at or under the margin" if conservative <= GATE_MARGIN else "over 1,000"),
                "s per seed (family)": round(per_seed),
                "confirmatory CPU hours": round(cost / 3600, 1) if cost else "",
                "eligible": "yes" if cost and cost <= SEARCH_BUDGET_SECONDS else "no",
            }
        )
    return rows


def render(entries: list[dict]) -> str:
    """The evidence tables: a summary row per entry, then one section per (setting, task)."""
    parts = ["# Evidence: ISS vs BM25 vs random, with controls\n"]
    if entries:
        parts.append(
            "\n## Summary: paired differences of test F1 (x100), mean [95% t-interval], a verdict where the interval "
            f"excludes 0\n\nA comparison is read only where its positive control passed (TLM - random corpus above "
            f"+{GATE_MARGIN:g} point over the whole interval). Entries made before issue 28 are superseded: their "
            f"intervals hold fine-tuning noise only.\n\n{markdown_rows(summary_rows(entries))}"
        )
    if search := search_rows(entries):
        parts.append(
            "\n## Regime search (issue 41), read by its rule\n\nControl only, search seeds; the rule "
            "(docs/evidence.md) picks the eligible candidate whose confirmatory run (80 % power to clear the +1 margin "
            "at the conservative effect) costs least on this machine; eligible: at most "
            f"{SEARCH_BUDGET_SECONDS // 3600} CPU hours.\n\n"
            f"{markdown_rows(search)}"
        )
    for entry in entries:
        heading = f"{entry['task']} — {SETTING_TITLES.get(entry['setting'], entry['setting'])}"
        if "stopped" in entry:  # a regime tried and stopped before it gave a comparison: what it measured, and why
            parts.append(f"\n## {heading}\n\n`{entry['config']}`: stopped. {entry['stopped']}\n")
            continue
        command = run_command(entry)
        if entry.get("variant"):
            heading += f", {entry['variant']}"
        cost = f"{entry['wall_seconds']} s wall, {entry['stage_seconds_total']} s summed over its stages"
        rss = f"peak RSS {entry['peak_rss_gib']} GiB"
        if "new_stage_seconds" in entry:  # a variant run with --reuse-from (an earlier protocol has its own)
            cost = f"{entry['new_stage_seconds']} s in the stages it recomputed (the others are the base run's)"
        if "new_stage_seconds" in entry or entry["wall_seconds"] < entry["stage_seconds_total"] / 2:
            rss += " in this invocation (stages made by an earlier run were reused)"
        parts.append(f"\n## {heading}\n")
        if "superseded" in entry:
            parts.append(f"\n**{entry['superseded'][0].upper()}{entry['superseded'][1:]}.**\n")
        if "control_note" in entry:
            parts.append(f"\n**The control as it was drawn:** {entry['control_note']}\n")
        elif "seeds" in entry:
            seeds, control = entry["seeds"], entry["positive_control"]
            parts.append(
                f"\nPretraining seeds {seeds['pretraining']}, fine-tuning seeds {seeds['finetuning']}; "
                f"{entry['intervals']}. Positive control (TLM - random corpus > +{control['margin']:g}): "
                f"**{'passed' if control['passed'] else 'not passed'}**.\n"
            )
        parts.append(
            f"\n`{command}`: {cost}, {rss} "
            f"(2 CPU cores). Test F1 x 100 at the best dev epoch, mean ± std over seeds.\n\n"
        )
        parts.append(markdown(results_table(entry["runs"])))
        if "mlm_head" in entry:
            head = entry["mlm_head"]
            parts.append(
                f"\nMLM head fitted first (encoder frozen): {head['steps']} steps on {head['sample_docs']} corpus "
                f"documents, MLM loss {head['mlm']} at the end ({head['seconds']} s).\n"
            )
        if "best_epochs" in entry:
            best = entry["best_epochs"]
            parts.append(
                f"\nBest dev epoch: {best['at_last_epoch']} of {best['runs']} fine-tuning runs at the last of "
                f"{best['epochs']} epochs (still learning there); by epoch: "
                + ", ".join(
                    f"{epoch}: {count}" for epoch, count in sorted(best["counts"].items(), key=lambda i: int(i[0]))
                )
                + ".\n"
            )
        for key, title in (
            ("differences", "Paired differences (x100) with 95% t-intervals"),
            ("subsets", "Subsets (mean length in WordPiece tokens)"),
            ("sources", "Where the documents come from (corpus sources)"),
            ("overlap", "Documents shared by two subsets of the pool (and by two random draws of their sizes)"),
            ("mechanism", "Mechanism check (no fine-tuning; test split)"),
            ("pretraining", "Pretraining: MLM loss (smoothed) at the last step vs the subset's unigram level"),
        ):
            rows = [
                {k: v for k, v in row.items() if (k not in ("task", "budget") or v) and k != "curve"}
                for row in entry.get(key, [])
            ]
            parts += markdown_sections(mechanism_sections(rows, title=title) if key == "mechanism" else [(title, rows)])
        tokens = entry.get("equal_tokens")
        if tokens:
            title = f"Mechanism check at an equal-token budget ({tokens['budget_tokens']} tokens per subset)"
            parts += markdown_sections(mechanism_sections(tokens["mechanism"], title=title))
        for variant in entry.get("variants", []):
            changed = ", ".join(f"{k}={v}" for k, v in variant["overrides"].items())
            accuracy = variant["warmup"].get("dev_accuracy")
            title = f"Mechanism check, {variant['label']} ({changed}; warm-up dev accuracy {accuracy})"
            parts += markdown_sections(mechanism_sections(variant["mechanism"], title=title))
    return "".join(parts)


def markdown_sections(sections: list[tuple[str, list[dict]]]) -> list[str]:
    """Titled Markdown tables (losses to 4 decimals), empty tables left out."""
    return [f"\n### {title}\n\n{markdown_rows(precise_losses(rows))}" for title, rows in sections if rows]


def entry_key(entry: dict) -> tuple[str, str, str | None]:
    """An entry is one (setting, task), or one variant of it."""
    return entry["setting"], entry["task"], entry.get("variant")


def load(path: Path) -> dict:
    """The entries of a results JSON by (setting, task, variant)."""
    done = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"entries": []}
    return {entry_key(e): e for e in done["entries"]}


def save(path: Path, entry: dict) -> dict:
    """Put one entry into the JSON (read again now, so runs of other tasks in other processes keep theirs) and
    rewrite the Markdown beside it; returns every entry."""
    RESULTS.mkdir(exist_ok=True)
    entries = load(path)
    entries[entry_key(entry)] = entry
    machine = {"platform": platform.platform(), "cpus": os.cpu_count()}
    path.write_text(json.dumps({"machine": machine, "entries": list(entries.values())}, indent=2))
    path.with_suffix(".md").write_text(render(list(entries.values())), encoding="utf-8")
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["further", "scratch"])
    parser.add_argument("--tasks", nargs="+", default=["acl_arc", "scierc", "chemprot"])
    parser.add_argument("--runs-root", type=Path, default=Path("runs/evidence"))
    parser.add_argument("--force", action="store_true", help="Rerun (setting, task) pairs already in the JSON.")
    parser.add_argument(
        "--mechanism-variant",
        metavar="LABEL",
        help="Only add a mechanism-check variant (with --set overrides) to (setting, task) entries already run.",
    )
    parser.add_argument(
        "--variant",
        metavar="LABEL",
        help="Run every method and seed again with --set overrides, as an entry of its own next to the base run.",
    )
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="Only remake the tables read from run folders (best epochs, sources, overlap) of entries in the JSON.",
    )
    parser.add_argument(
        "--mechanism",
        action="store_true",
        help="Only make the mechanism check of entries already in the JSON again from their config as it is now "
        "(e.g. after raising evaluation.mechanism_repeats); finished checks are reused.",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--plan",
        type=Path,
        help="The pre-registered plan (a config) a confirmatory entry must follow: its seeds are checked, and the "
        "plan's file and the commit that last changed it are recorded in the entry.",
    )
    parser.add_argument(
        "--output",
        action="append",
        metavar="NAME",
        help="Results file stem under benchmarks/results (NAME.json, NAME.md; default evidence); given twice, each "
        "entry goes into both (the first decides what was run already).",
    )
    args = parser.parse_args()
    if args.mechanism_variant and args.variant:  # a mechanism variant runs on the base config, not a variant's
        parser.error("--mechanism-variant adds to a base entry; it cannot be combined with --variant")
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.overrides)}
    path, *more_paths = (RESULTS / f"{name}.json" for name in args.output or ["evidence"])

    def save_all(entry: dict) -> dict:
        for other in more_paths:
            save(other, entry)
        return save(path, entry)

    entries = load(path)
    for setting in args.settings:
        for task in args.tasks:
            key = (setting, task, args.variant)
            if args.refresh:
                if key in entries:
                    run_dir = args.runs_root / setting / task
                    entries = save_all(
                        refresh(entries[key], variant_dir(run_dir, args.variant) if args.variant else run_dir)
                    )
                continue
            if args.mechanism:
                if key in entries and not args.variant:
                    entries = save_all(mechanism_again(setting, task, args.runs_root, load(path)[key]))
                continue
            if args.mechanism_variant:
                if key in entries:
                    variant = mechanism_variant(setting, task, args.runs_root, args.mechanism_variant, overrides)
                    entry = load(path)[key]
                    variants = [v for v in entry.get("variants", []) if v["label"] != variant["label"]]
                    entries = save_all({**entry, "variants": [*variants, variant]})
                continue
            if key in entries and not args.force:
                print(f"{setting}/{task}: in {path.name} already (--force reruns it)", file=sys.stderr)
                continue
            if not (SETTINGS[setting] / f"{task}.yaml").is_file():
                print(f"{setting}/{task}: no config, skipped", file=sys.stderr)
                continue
            planned = load_config(SETTINGS[setting] / f"{task}.yaml").with_overrides(overrides)
            refuse_reserved(sorted({p for p, _ in planned.seed_pairs()}), f"{setting}/{task}")
            print(f"iss run {setting}/{task} {args.variant or ''}...", file=sys.stderr, flush=True)
            entry = run_one(setting, task, args.runs_root, args.variant, overrides)
            if args.plan:
                check_against_plan(entry, load_config(args.plan))
                entry["plan"] = {"file": str(args.plan), "commit": plan_commit(args.plan)}
            if entry.get("mechanism") and not args.variant:  # a variant reuses the base's mechanism folders
                entry["equal_tokens"] = token_budget_mechanism(base_config(setting, task, args.runs_root), entry)
            earlier = load(path).get(key, {})
            entry["variants"] = earlier.get("variants", [])
            if earlier.get("stage_seconds_total") == entry["stage_seconds_total"]:  # every stage reused: keep the
                entry["wall_seconds"] = earlier["wall_seconds"]  # cost of the run that computed them
                entry["peak_rss_gib"] = earlier["peak_rss_gib"]
            entries = save_all(entry)
    print(path.with_suffix(".md").read_text(encoding="utf-8") if entries else "nothing run")


if __name__ == "__main__":
    main()
