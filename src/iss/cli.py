"""The ``iss`` command line: parses options, builds the config, calls the pipeline. Nothing else.

Everything heavy (torch, datasets, the pipeline) is imported inside the commands, so ``iss --help`` and
``iss --version`` answer at once.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from iss._version import __version__
from iss.config.io import load_config
from iss.config.reference import reference_markdown
from iss.config.schema import SELECTION_METHOD_NAMES, IssConfig
from iss.errors import IssError

if TYPE_CHECKING:
    from iss.pipeline.run import Pipeline
    from iss.runs.folder import StageResult

app = typer.Typer(
    help="Influential Subset Selection: pick the corpus subset that helps one end task most.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"iss {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Influential Subset Selection: pick the corpus subset that helps one end task most."""


ConfigArg = Annotated[Path | None, typer.Argument(help="YAML config (defaults: ChemProt + the shared corpus).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: --set influence.layer=1")]
RunDirOpt = Annotated[str | None, typer.Option("--run-dir", help="Run folder (overrides run_dir).")]
ReuseOpt = Annotated[
    Path | None,
    typer.Option(
        "--reuse-from",
        help="Link another run folder's finished stages in first: an ablation (--set ...) in a new --run-dir "
        "computes only the stages its changes reach.",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs.")]
NoRecomputeOpt = Annotated[
    bool,
    typer.Option(
        "--no-recompute",
        help="Refuse, in one line, a finished stage whose files are missing or changed, instead of recomputing it.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the stage summaries as JSON on stdout.")]
BackendOpt = Annotated[
    str | None, typer.Option("--backend", help="local (default) or ray: where retrieval and influence run.")
]


def _build_config(config: Path | None, overrides: list[str] | None, extra: dict[str, Any]) -> IssConfig:
    parsed: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        parsed[key.strip()] = yaml.safe_load(value)
    parsed.update({k: v for k, v in extra.items() if v is not None})
    return load_config(config).with_overrides(parsed)


Action = Callable[["Pipeline"], "StageResult"]


def _method(name: str) -> Action:
    """The Pipeline method ``name`` as a command's action."""
    return lambda pipeline: getattr(pipeline, name)()


def _run(
    action: Action,
    config: Path | None,
    overrides: list[str] | None,
    quiet: bool,
    as_json: bool,
    reuse_from: Path | None = None,
    no_recompute: bool = False,
    **extra: Any,
) -> None:
    """Build the config, run ``action`` on its pipeline, print results."""
    _logging(quiet)
    with _one_line_errors():
        settings = _build_config(config, overrides, extra)
        from iss.pipeline.run import Pipeline
        from iss.runs.folder import RunFolder

        if reuse_from is not None:
            linked = RunFolder(settings.run_dir).link_stages_from(reuse_from)
            logging.getLogger("iss").info("linked %d finished stages from %s", len(linked), reuse_from)
        pipeline = Pipeline(settings, show_progress=not quiet, recompute=not no_recompute)
        result = action(pipeline)
    _report(pipeline, result, quiet, as_json)


def _logging(quiet: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
    )


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """The user's errors (bad config or data: an :class:`IssError`, an invalid config) end the command with one
    line and exit code 2; anything else is a bug and keeps its traceback."""
    try:
        yield
    except (IssError, ValidationError) as error:
        _one_line(str(error))
        raise typer.Exit(2) from error
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _one_line(f"{error.strerror} ({error.filename or 'writing'}): free some space; no half-written stage is reused")
        raise typer.Exit(2) from error


def _one_line(message: str) -> None:
    console.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", soft_wrap=True)  # brackets kept


def _report(pipeline: Pipeline, result: StageResult, quiet: bool, as_json: bool) -> None:
    from iss.runs.processes import processes

    if not processes().is_main:  # under `accelerate launch` one process speaks for all
        return
    summaries = {name: {"path": str(r.path), "reused": r.reused, **r.summary} for name, r in pipeline.results.items()}
    if as_json:
        json.dump(summaries, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    if quiet:
        return
    ran = [r for r in pipeline.results.values() if not r.reused]
    seconds = sum(float(r.summary.get("seconds", 0)) for r in ran)
    # short: what the command made, not every stage (`--json` and the run folder's manifest hold them all)
    details = {k: v for k, v in result.summary.items() if k != "seconds" and not isinstance(v, list | dict)}
    results = Console(soft_wrap=True)  # the results go to stdout; logs and progress to stderr
    results.print(f"{result.name}: " + ", ".join(f"{k}={v}" for k, v in details.items()), markup=False)
    scores = result.path / "results.md"
    if scores.is_file():  # `iss run`: the score table (the differences and subsets follow it in the file)
        results.print(scores.read_text(encoding="utf-8").split("\n\n###")[0])
        _print_verdict(results, result.path / "results.json")
    results.print(
        f"{len(ran)} stages ran ({seconds:.0f} s), {len(pipeline.results) - len(ran)} reused; output: {result.path}",
        markup=False,
    )


def _print_verdict(out: Console, path: Path) -> None:
    """Under the table: per task, the positive control and each comparison's verdict (iss.compare)."""
    from iss.comparison.verdict import TaskVerdict
    from iss.runs.folder import read_json

    for verdict in read_json(path, "the run's results", f"delete {path.parent} and rerun the command").get(
        "verdict", []
    ):
        out.print("verdict: " + TaskVerdict.from_json(verdict).sentence(), markup=False)


@app.command()
def select(
    config: ConfigArg = None,
    method: Annotated[str | None, typer.Option(help=f"One of {', '.join(SELECTION_METHOD_NAMES)}.")] = None,
    budget: Annotated[str | None, typer.Option(help="'2000 docs', '1e6 tokens' or '20%' of the pool.")] = None,
    run_dir: RunDirOpt = None,
    reuse_from: ReuseOpt = None,
    backend: BackendOpt = None,
    overrides: SetOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    no_recompute: NoRecomputeOpt = False,
) -> None:
    _run(
        _method("select"),
        config,
        overrides,
        quiet,
        as_json,
        reuse_from,
        no_recompute,
        **{"selection.method": method, "selection.budget": budget, "run_dir": run_dir, "backend": backend},
    )


select.__doc__ = (
    f"Select a subset with one method ({', '.join(SELECTION_METHOD_NAMES)}); runs or reuses every stage it needs."
)


def _stage_command(name: str, doc: str, action: Action | None = None, group: typer.Typer = app) -> None:
    """A command ``name`` that runs ``action`` (default: the Pipeline method of that name) on the config's run."""
    action = action or _method(name)

    def command(
        config: ConfigArg = None,
        run_dir: RunDirOpt = None,
        reuse_from: ReuseOpt = None,
        backend: BackendOpt = None,
        overrides: SetOpt = None,
        quiet: QuietOpt = False,
        as_json: JsonOpt = False,
        no_recompute: NoRecomputeOpt = False,
    ) -> None:
        _run(action, config, overrides, quiet, as_json, reuse_from, no_recompute, run_dir=run_dir, backend=backend)

    command.__doc__ = doc
    group.command(name=name)(command)


_stage_command("data", "Load the task splits and label mapping into the run folder.")
_stage_command("tokenizer", "Train (or copy) the WordPiece tokenizer.")
_stage_command("retrieval", "BM25-retrieve the candidate pool (the TLM pool) from the corpus.")
_stage_command("warmup", "Warm up the model on the task with MLM + task loss.")
_stage_command("influence", "Score candidates by gradient matching and keep the top-k per task sample.")
_stage_command("pretrain", "Pretrain on the selected subset (TLM objective from scratch, or further pretraining).")
_stage_command("finetune", "Fine-tune the pretrained model; dev/test F1 at the best dev epoch.")
_stage_command("evaluate", "Fine-tune once per seed (finetune.seeds); mean and std of dev/test F1.")


def _run_all_estimated(pipeline: Pipeline) -> StageResult:
    """``run_all``, after saying how long a fresh run folder would take on this machine: before any stage runs
    (the pool forecast), and again once retrieval has made the pool, kept in the run folder's ``estimate.json``
    (see iss.estimate; one process only: the estimate runs outside the lockstep of several processes). A finished
    run calibrates the next estimates on this machine."""
    from iss.pipeline.estimate import ESTIMATE_FILE, FORECAST_FILE, estimate_run, learn_from_run
    from iss.runs.processes import processes

    if processes().distributed:
        return pipeline.run_all()
    forecast = estimate_run(pipeline)
    forecast.save(pipeline.run.root / FORECAST_FILE)
    if pipeline.show_progress:
        console.print(forecast.describe())
    pipeline.retrieval()
    estimate = estimate_run(pipeline, with_pool=True, seconds_per_token=forecast.seconds_per_token)
    estimate.save(pipeline.run.root / ESTIMATE_FILE)
    if pipeline.show_progress:
        console.print(estimate.describe())
    result = pipeline.run_all()
    if manifest := pipeline.run.read_manifest():
        learn_from_run(pipeline, manifest)
    return result


_stage_command(
    "run",
    "The whole loop for every method and seed: select, pretrain, fine-tune, evaluate; writes the results table. "
    "Prints the estimated time first.",
    _run_all_estimated,
)


analyze_app = typer.Typer(help="The paper's analyses: influential words, t-SNE of task features, layer ablation.")
app.add_typer(analyze_app, name="analyze")


def _analysis(name: str) -> Action:
    """``iss.analysis.analyze_<name>``, imported when the command runs (matplotlib, scikit-learn: not at start)."""

    def action(pipeline: Pipeline) -> StageResult:
        from iss.stages import analysis

        return getattr(analysis, f"analyze_{name}")(pipeline)

    return action


_stage_command(
    "words",
    "PMI of words and labels; frequency of the top task words in each subset and the corpus (Table 6).",
    _analysis("words"),
    analyze_app,
)
_stage_command(
    "tsne",
    "t-SNE of the test texts' [CLS] features: ISS- vs TLM-pretrained vs untrained model (Figure 4).",
    _analysis("tsne"),
    analyze_app,
)
_stage_command(
    "layers",
    "Select at the embeddings and each block, fine-tune each: F1 and selection time per layer (Fig. 3, Tab. 7).",
    _analysis("layers"),
    analyze_app,
)


RunFolderArg = Annotated[Path | None, typer.Argument(help="A run folder; the same as --run-dir (the older form).")]


def _run_folder(folder: Path | None, run_dir: str | None) -> Path:
    """The run folder of ``report`` and ``export``: ``--run-dir`` as every command takes it, or the older argument."""
    if folder is not None and run_dir is not None and Path(run_dir) != folder:
        raise IssError(f"two run folders: {folder} and --run-dir {run_dir}; give one")
    if folder is None and run_dir is None:
        raise IssError("say which run folder: --run-dir DIR")
    return folder if folder is not None else Path(run_dir)


@app.command("report")
def report(
    folder: RunFolderArg = None,
    run_dir: RunDirOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN_DIR/report).")] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """One self-contained HTML page (and Markdown) with config, results, selection, scores, plots, timings."""
    _logging(quiet)
    from iss.report.html import write_report

    with _one_line_errors():
        summary = write_report(_run_folder(folder, run_dir), out)
    if as_json:
        print(json.dumps(summary, indent=2))
    elif not quiet:
        console.print(f"report: {summary['html']} ({len(summary['sections'])} sections, {summary['figures']} figures)")


@app.command("export")
def export(
    archive: Annotated[Path, typer.Argument(help="The .tar.gz to write (after RUN_DIR, in the older form).")],
    second: Annotated[Path | None, typer.Argument(hidden=True)] = None,
    run_dir: RunDirOpt = None,
    stages: Annotated[
        list[str] | None, typer.Option("--stages", help="Stage-name patterns to carry (default: every finished one).")
    ] = None,
    skip: Annotated[list[str] | None, typer.Option("--skip", help="Stage-name patterns to leave out.")] = None,
) -> None:
    """Pack finished stages (with their fingerprints) into one archive that `iss import` takes elsewhere."""
    from iss.runs.folder import RunFolder

    if second is not None:  # `iss export RUN_DIR ARCHIVE`, as before --run-dir
        run_dir, archive = str(archive), second
    with _one_line_errors():
        names = RunFolder.existing(_run_folder(None, run_dir)).export(archive, stages, skip)
    print(json.dumps({"archive": str(archive), "stages": names, "bytes": archive.stat().st_size}, indent=2))


@app.command("import")
def import_(
    archive: Annotated[Path, typer.Argument(help="An archive written by `iss export`.")],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="The local config: its run folder receives the "
            "stages, and the keys where the archive's run differs are listed.",
        ),
    ] = None,
    run_dir: RunDirOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Bring an exported run's finished stages into a run folder; the stages this config reaches are reused."""
    from iss.runs.folder import RunFolder

    with _one_line_errors():
        if not archive.is_file():
            raise IssError(f"archive not found: {archive}")
        settings = _build_config(config, overrides, {"run_dir": run_dir}) if config or run_dir else None
        if settings is None:
            raise IssError("say where the stages go: --config CONFIG (its run_dir) or --run-dir DIR")
        report = RunFolder(settings.run_dir).import_archive(
            archive, settings.model_dump(mode="json") if config else None
        )
    print(json.dumps({"run_dir": settings.run_dir, **report}, indent=2))


@app.command("config")
def show_config(
    config: ConfigArg = None,
    reference: Annotated[
        bool, typer.Option("--reference", help="Print every key with its default and meaning (Markdown) instead.")
    ] = False,
) -> None:
    """Print the full config (defaults filled in) as YAML, a starting point for your own."""
    if reference:
        print(reference_markdown(), end="")
        return
    with _one_line_errors():
        print(yaml.safe_dump(load_config(config).model_dump(mode="json"), sort_keys=False), end="")


def commands_markdown() -> str:
    """The command table of the README, from the commands registered here (a test keeps the README's copy current)."""
    rows = ["| command | what it does |", "| --- | --- |"]
    groups = [("", app), *((f"{group.name} ", group.typer_instance) for group in app.registered_groups)]
    for prefix, group in groups:
        for command in group.registered_commands:
            name = command.name or command.callback.__name__.replace("_", "-")
            summary = " ".join((command.help or command.callback.__doc__ or "").split("\n\n")[0].split())
            rows.append(f"| `iss {prefix}{name}` | {summary} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    app()
