"""`iss select` end to end from the command line on ChemProt (train subset) against the shared corpus."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

import iss
from iss import cli

from .conftest import CLI_BUDGET as BUDGET
from .conftest import TINY_TRAINING
from .conftest import iss_command as _iss
from .test_fingerprints import assert_walk_matches_run


@pytest.mark.slow
def test_select_iss_tlm_random_end_to_end(config_file):
    runs = {}
    for method in ("iss", "tlm", "random"):
        result = _iss("select", str(config_file), "--method", method, "--quiet", "--json")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[method] = json.loads(result.stdout)
    run_dir = config_file.parent / "run"
    subsets = {m: pq.read_table(run_dir / f"select-{m}" / "subset.parquet") for m in runs}
    pool = pq.read_table(run_dir / "retrieval" / "pool.parquet")
    pool_ids = set(pool.column("corpus_id").to_pylist())

    for method, subset in subsets.items():
        ids = subset.column("corpus_id").to_pylist()
        assert len(ids) == BUDGET == len(set(ids)), method
        assert set(ids) <= pool_ids, method
        with gzip.open(run_dir / f"select-{method}" / "subset.jsonl.gz", "rt", encoding="utf-8") as handle:
            assert [json.loads(line)["corpus_id"] for line in handle] == ids
        assert np.load(run_dir / f"select-{method}" / "ids.npy").tolist() == ids
    assert set(subsets["iss"].column("corpus_id").to_pylist()) != set(subsets["tlm"].column("corpus_id").to_pylist())

    iss_rows = subsets["iss"].to_pylist()
    assert all(row["chosen_by"] and all(c.startswith("dev:") for c in row["chosen_by"]) for row in iss_rows)
    assert all(row["score"] is not None for row in iss_rows)
    for row in subsets["tlm"].to_pylist():
        assert row["chosen_by"] and all(c.startswith("train:") for c in row["chosen_by"])
        assert row["score"] <= row["bm25_score"] + 1e-4  # best over its choosers <= best over all queries
    assert all(row["chosen_by"] == [] and row["score"] is None for row in subsets["random"].to_pylist())

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {
        "data",
        "tokenizer",
        "retrieval",
        "warmup",
        "influence",
        "select-iss",
        "select-tlm",
        "select-random",
    } <= set(manifest["stages"])
    assert runs["iss"]["influence"]["layer"] == "block2"

    # Rerunning with the same config reuses every finished stage.
    again = _iss("select", str(config_file), "--method", "iss", "--quiet", "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(stage["reused"] for stage in json.loads(again.stdout).values())

    # A different layer invalidates influence and selection only.
    layer = _iss("select", str(config_file), "--set", "influence.layer=embeddings", "--quiet", "--json")
    assert layer.returncode == 0, layer.stderr[-3000:]
    stages = json.loads(layer.stdout)
    assert stages["warmup"]["reused"] and stages["retrieval"]["reused"]
    assert "influence" not in stages  # the last block's artifact stays, next to the new layer's
    assert stages["influence-layerembeddings"]["layer"] == "embeddings"
    assert (run_dir / "influence" / "topk.parquet").is_file()

    # An ablation in a new run folder links the finished stages in and recomputes only what its change reaches.
    ablation_dir = config_file.parent / "ablation"
    half = _iss(
        "select", str(config_file), "--run-dir", str(ablation_dir), "--reuse-from", str(run_dir),
        "--set", f"selection.budget={BUDGET // 2} docs", "--quiet", "--json",
    )  # fmt: skip
    assert half.returncode == 0, half.stderr[-3000:]
    stages = json.loads(half.stdout)
    assert all(stages[name]["reused"] for name in ("data", "tokenizer", "retrieval", "warmup", "influence"))
    assert not stages["select-iss"]["reused"]
    assert pq.read_table(ablation_dir / "select-iss" / "subset.parquet").num_rows == BUDGET // 2
    assert pq.read_table(run_dir / "select-iss" / "subset.parquet").num_rows == BUDGET


def test_cli_reports_bad_config_in_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("influence:\n  layer: middle\n", encoding="utf-8")
    result = _iss("select", str(path), "--quiet")
    assert result.returncode == 2
    assert "layer must be 'last', 'embeddings' or a block number" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_config_typo_names_the_file_the_key_and_the_nearest_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("influence:\n  layr: 2\nselection:\n  budget: 10%\nfinetune:\n  epochs: 0\n", encoding="utf-8")
    line = _one_error_line(_iss("select", str(path), "--quiet"))
    assert f"{path}: unknown key 'influence.layr'; did you mean 'influence.layer'?" in line
    assert "finetune.epochs: Input should be greater than or equal to 1" in line
    assert "pydantic" not in line
    line = _one_error_line(_iss("config", str(path.with_name("none.yaml"))))
    assert "config file not found" in line
    line = _one_error_line(_iss("select", "--set", "corpus.mixture.weigths={}", "--quiet"))
    assert "did you mean 'corpus.mixture.weights'?" in line


def test_export_and_import_say_what_is_wrong_in_one_line(tmp_path):
    assert "is not an iss run folder" in _one_error_line(_iss("export", str(tmp_path), str(tmp_path / "a.tar.gz")))
    assert "archive not found" in _one_error_line(_iss("import", str(tmp_path / "none.tar.gz"), "--run-dir", "x"))
    (tmp_path / "plain.tar.gz").write_bytes(b"")
    assert "say where the stages go" in _one_error_line(_iss("import", str(tmp_path / "plain.tar.gz")))
    line = _one_error_line(_iss("import", str(tmp_path / "plain.tar.gz"), "--run-dir", str(tmp_path / "run")))
    assert "not an iss export archive" in line


def test_version_and_help_answer_without_importing_torch():
    """`iss --help` and `--version` must be instant: the CLI module imports no torch, datasets or sklearn, and the
    method list in `iss select --help` is the registry's."""
    heavy = "import sys, iss.cli; print(sorted(m for m in ('torch', 'datasets', 'sklearn') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", heavy], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    version = _iss("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"iss {iss.__version__}"
    from iss.config.schema import SELECTION_METHOD_NAMES
    from iss.selection.methods import SELECTION

    assert tuple(SELECTION) == SELECTION_METHOD_NAMES
    assert ", ".join(SELECTION) in " ".join(_iss("select", "--help").stdout.split()).replace("│ ", "")


@pytest.mark.slow
def test_run_writes_a_table_with_every_method_and_finite_scores(config_file, monkeypatch):
    result = _iss("run", str(config_file), "--quiet", "--json", *TINY_TRAINING)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_walk_matches_run(config_file, config_file.parent / "run", monkeypatch)
    folder = config_file.parent / "run" / "results"
    report = json.loads((folder / "results.json").read_text())
    runs = report["runs"]
    assert {(r["method"], r["seed"]) for r in runs} == {
        (m, s) for m in ("iss", "tlm", "random", "none") for s in (0, 1)
    }
    assert all(0 <= r["test"] <= 1 and 0 <= r["dev"] <= 1 for r in runs)
    table = {line["method"]: line for line in report["table"]}
    assert set(table) == {"ISS", "TLM (BM25)", "random (pool)", "no pretraining"}
    for line in table.values():
        assert line["chemprot"]["seeds"] == 2 and 0 <= line["chemprot"]["mean"] <= 100
    # same budget and steps for every pretrained method, so the same FLOPs; none pretrains nothing
    assert table["ISS"]["flops"] == table["TLM (BM25)"]["flops"] == table["random (pool)"]["flops"] > 0
    assert table["no pretraining"]["flops"] == 0 and table["ISS"]["data_docs"] == BUDGET
    markdown = (folder / "results.md").read_text()
    assert "| ISS |" in markdown and "chemprot" in markdown
    (verdict,) = report["verdict"]  # no random-corpus among the methods: no control, so nothing is read
    assert verdict["task"] == "chemprot" and verdict["control"] is None and not verdict["control_passed"]
    assert {c["verdict"] for c in verdict["comparisons"]} == {"not read: no positive control"}
    assert {(c["first"], c["second"]) for c in verdict["comparisons"]} == {("iss", "tlm"), ("iss", "random")}
    assert len((folder / "results.csv").read_text().strip().splitlines()) == 1 + len(runs)

    # `iss evaluate` reuses the fine-tuned runs of the configured method and aggregates them
    result = _iss("evaluate", str(config_file), "--quiet", "--json", *TINY_TRAINING)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(result.stdout)["evaluate-iss"]
    assert all(json.loads(result.stdout)[f"finetune-iss-seed{s}"]["reused"] for s in (0, 1))
    iss_tests = [r["test"] for r in runs if r["method"] == "iss"]
    assert evaluated["test_mean"] == pytest.approx(sum(iss_tests) / 2)


@pytest.mark.slow
def test_budget_sweep_runs_each_method_once_per_budget(config_file):
    overrides = ["--set", "evaluation.budgets=[100 docs, 200 docs]", "--set", "evaluation.methods=[iss, random, none]",
                 "--set", "pretrain.steps=3", "--set", "pretrain.batch_size=8", "--set", "finetune.epochs=1",
                 "--set", "finetune.seeds=[0]", "--run-dir", str(config_file.parent / "sweep")]  # fmt: skip
    result = _iss("run", str(config_file), "--quiet", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = config_file.parent / "sweep"
    table = {line["method"]: line for line in json.loads((folder / "results" / "results.json").read_text())["table"]}
    assert set(table) == {
        "ISS (100 docs)",
        "ISS (200 docs)",
        "random (pool) (100 docs)",
        "random (pool) (200 docs)",
        "no pretraining",
    }
    assert table["ISS (100 docs)"]["data_docs"] == 100 and table["random (pool) (200 docs)"]["data_docs"] == 200
    assert table["ISS (200 docs)"]["flops"] == table["ISS (100 docs)"]["flops"]  # same steps, whatever the budget
    subsets = {b: pq.read_table(folder / f"select-iss@{b}docs" / "subset.parquet") for b in (100, 200)}
    small, large = (set(subsets[b].column("corpus_id").to_pylist()) for b in (100, 200))
    assert small < large  # a smaller budget keeps a prefix of the same ranking


def _one_error_line(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_budget_larger_than_the_pool_fails_in_one_line_and_keeps_finished_stages(config_file):
    first = _iss("select", str(config_file), "--method", "tlm", "--quiet", "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    pool_docs = json.loads(first.stdout)["retrieval"]["pool_docs"]
    line = _one_error_line(_iss("select", str(config_file), "--method", "tlm", "--budget", "99999 docs", "--quiet"))
    assert f"larger than the candidate pool ({pool_docs} docs)" in line
    again = json.loads(_iss("select", str(config_file), "--method", "tlm", "--quiet", "--json").stdout)
    assert again["retrieval"]["reused"] and again["select-tlm"]["reused"]  # nothing finished was lost


def test_mismatched_tokenizer_and_model_fail_in_one_line(tokenizer, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    small = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(small).save_pretrained(str(tmp_path / "model"))
    task = tmp_path / "task"
    task.mkdir()
    for split in ("train", "dev", "test"):
        rows = [{"text": f"{split} text {i}", "label": "AB"[i % 2]} for i in range(6)]
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    overrides = [f"task.path={task}", f"tokenizer.path={tmp_path / 'tokenizer'}", f"model.path={tmp_path / 'model'}"]
    args = [item for pair in (("--set", o) for o in overrides) for item in pair]
    line = _one_error_line(_iss("warmup", "--run-dir", str(tmp_path / "run"), "--quiet", *args))
    assert f"tokenizer has {len(tokenizer)} tokens but model" in line and "only 100 embeddings" in line


@pytest.mark.slow
def test_same_config_gives_a_byte_identical_subset_in_two_fresh_run_folders(config_file, tmp_path):
    """Two separate processes, two fresh run folders: the tokenizer is trained once and reused by content hash
    (WordPiece training is not deterministic across processes), so everything downstream is identical."""
    cache = tmp_path / "tokenizers"
    stages = []
    for name in ("first", "second"):
        result = _iss(
            "select", str(config_file), "--run-dir", str(tmp_path / name), "--set", f"tokenizer.cache_dir={cache}",
            "--quiet", "--json",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        stages.append(json.loads(result.stdout))
    assert [s["tokenizer"]["from_cache"] for s in stages] == [False, True]
    first, second = (
        {f.name: f.read_bytes() for f in (tmp_path / name / "select-iss" / "subset.parquet").iterdir()}
        for name in ("first", "second")
    )
    assert first == second and len(first) == 1


def test_a_run_dir_that_is_a_file_and_a_config_that_is_not_yaml_end_in_one_line(config_file, tmp_path):
    """Bad input ends with one line and exit 2, not a traceback (issue 42's newcomer edges)."""
    taken = tmp_path / "taken"
    taken.write_text("x")
    result = _iss("select", str(config_file), "--run-dir", str(taken), "--method", "tlm", "--quiet")
    assert result.returncode == 2 and "is a file, not a folder" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    jsonl = tmp_path / "corpus.jsonl"  # a data file passed where the config goes
    jsonl.write_text('{"text": "a document"}\n{"text": "another"}\n')
    result = _iss("run", str(jsonl), "--quiet")
    assert result.returncode == 2 and "not a YAML config (line 2)" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_report_and_export_take_the_run_folder_as_every_command_does(tmp_path):
    """``--run-dir`` (every command's convention) and the older positional RUN_DIR name the same folder."""
    from typer.testing import CliRunner

    runner, missing = CliRunner(), str(tmp_path / "no-run")
    archive = str(tmp_path / "a.tar.gz")
    for older, newer in [
        (["report", missing], ["report", "--run-dir", missing]),
        (["export", missing, archive], ["export", archive, "--run-dir", missing]),
    ]:
        before, after = runner.invoke(cli.app, older), runner.invoke(cli.app, newer)
        assert before.exit_code == after.exit_code == 2
        assert "no-run" in after.output and before.output == after.output
    neither = runner.invoke(cli.app, ["report"])
    assert neither.exit_code == 2 and "--run-dir" in neither.output
