"""The numbers behind each analysis plot, and the analyses + report end to end (report opened in Chromium)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from iss.comparison.tables import markdown_rows
from iss.errors import ConfigError
from iss.influence.scorer import InfluenceResult
from iss.retrieval.topk import TopK
from iss.stages.analysis import label_pmi, label_separation, top_words, tsne_embed, word_counts

from .conftest import TINY_TRAINING, iss_command

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_pmi_matches_a_hand_computation():
    texts = ["gene protein binds", "gene inhibits", "protein binds the receptor", "weather sunny", "sunny gene"]
    labels = np.array([0, 0, 0, 1, 1])
    words, pmi, joint = label_pmi(texts, labels, n_labels=2, min_docs=2)
    assert words == ["binds", "gene", "protein", "sunny"]  # seen in >= 2 texts; "the" is a stop word
    index = {w: i for i, w in enumerate(words)}
    n = 5
    # gene: in 3 texts, 2 with label 0 (3 texts), 1 with label 1 (2 texts)
    assert pmi[index["gene"], 0] == pytest.approx(math.log((2 / n) / ((3 / n) * (3 / n))))
    assert pmi[index["gene"], 1] == pytest.approx(math.log((1 / n) / ((3 / n) * (2 / n))))
    assert pmi[index["sunny"], 1] == pytest.approx(math.log((2 / n) / ((2 / n) * (2 / n))))
    assert pmi[index["sunny"], 0] == -np.inf and joint[index["sunny"], 0] == 0
    assert joint[index["binds"]].tolist() == [2, 0]

    top = top_words(words, pmi, joint, ["bio", "weather"], n=2, min_joint=2)
    assert [row["word"] for row in top] == ["sunny", "binds"]  # log(2.5) > log(5/3) (binds ties protein: alphabetical)
    assert top[0]["label"] == "weather" and top[0]["task_docs"] == 2


def test_top_words_ignore_pairs_seen_too_rarely():
    texts = ["gene binds", "gene binds", "gene", "rare gene", "rare", "weather"]
    labels = np.array([0, 0, 0, 0, 1, 2])  # label 2 has one text: "rare" would top a plain PMI ranking via label 1
    words, pmi, joint = label_pmi(texts, labels, n_labels=3, min_docs=2)
    assert pmi[words.index("rare"), 1] == pytest.approx(math.log(6 / 2))  # joint 1: one text only
    assert top_words(words, pmi, joint, ["a", "b", "c"], n=5, min_joint=1)[0]["word"] == "rare"
    strict = top_words(words, pmi, joint, ["a", "b", "c"], n=5, min_joint=2)
    # gene and binds tie at log(1.5) with label a; gene is in more texts
    assert [(row["word"], row["label"], row["task_docs"]) for row in strict] == [("gene", "a", 4), ("binds", "a", 2)]


def test_pmi_names_the_setting_when_no_word_is_frequent_enough():
    with pytest.raises(ConfigError, match="min_word_docs"):
        label_pmi(["one text", "another"], np.array([0, 1]), 2, min_docs=5)


def test_word_counts_are_whole_word_and_case_insensitive():
    counts, total = word_counts([["Gene gene-level genes", "GENE and gene"], ["no match here"]], ["gene", "genes"])
    assert counts.tolist() == [3, 1]  # "gene-level" is one word, not "gene"
    assert total == 3 + 3 + 3


def test_tsne_shape_finite_and_separation_ranks_clusters():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    apart = rng.normal(size=(60, 16)) * 0.1 + np.eye(16)[labels] * 5
    mixed = rng.normal(size=(60, 16))
    xy = tsne_embed(apart, perplexity=30, seed=0)
    assert xy.shape == (60, 2) and np.isfinite(xy).all()
    assert tsne_embed(apart[:5], perplexity=30, seed=0).shape == (5, 2)  # perplexity capped for tiny inputs
    assert label_separation(apart, labels) > 0.8 > label_separation(mixed, labels)
    assert math.isnan(label_separation(mixed, np.zeros(60, int)))


def test_influence_result_round_trips_and_takes_each_units_best_score(tmp_path):
    result = InfluenceResult(
        TopK(np.array([[0, 2, -1], [2, 1, 0]]), np.array([[3.0, 1.0, -np.inf], [5.0, 2.0, 0.0]], np.float32)),
        task_units=[["a", "b"], ["c"]],
        pool_units=[[10, 20], [11], [12], [13]],
        unit_means=np.array([1.5, 2.0, 3.0, np.nan]),
    )
    result.save(tmp_path)
    loaded = InfluenceResult.load(tmp_path)
    np.testing.assert_array_equal(loaded.top.ids, result.top.ids)
    np.testing.assert_array_equal(loaded.top.scores, result.top.scores)
    assert loaded.task_units == [["a", "b"], ["c"]] and loaded.pool_units == result.pool_units
    np.testing.assert_array_equal(loaded.unit_means, result.unit_means)
    assert loaded.best_scores() == {10: 3.0, 11: 2.0, 12: 5.0}  # unit 3 never ranked


def test_markdown_rows_formats_floats_and_missing_values():
    text = markdown_rows([{"a": 1, "b": 0.123456, "c": float("nan")}, {"a": 2, "b": 3.0, "c": None}])
    assert text.splitlines() == ["| a | b | c |", "| --- | --- | --- |", "| 1 | 0.123 | — |", "| 2 | 3 |  |"]


@pytest.mark.slow
def test_analyses_and_report_end_to_end(config_file):
    tiny = [*TINY_TRAINING, "--set", "analysis.min_word_docs=2"]
    run_dir = config_file.parent / "run"
    assert iss_command("run", str(config_file), "--quiet", *TINY_TRAINING).returncode == 0  # the results table

    words = iss_command("analyze", "words", str(config_file), "--quiet", "--json", *tiny)
    assert words.returncode == 0, words.stderr[-3000:]
    rows = json.loads((run_dir / "analysis-words" / "words.json").read_text())
    assert len(rows) == 20 and (run_dir / "analysis-words" / "words.png").stat().st_size > 10_000
    subset = pq.read_table(run_dir / "select-tlm" / "subset.parquet").column("text").to_pylist()
    counts, _ = word_counts([subset], [rows[0]["word"]])
    assert rows[0]["tlm_count"] == counts[0]  # the bar is the subset's real count
    assert [row["pmi"] for row in rows] == sorted((row["pmi"] for row in rows), reverse=True)
    assert all(row["corpus_count"] >= row["random_count"] for row in rows)  # random is a subset of the corpus

    tsne = iss_command("analyze", "tsne", str(config_file), "--quiet", "--json", *tiny)
    assert tsne.returncode == 0, tsne.stderr[-3000:]
    points = pq.read_table(run_dir / "analysis-tsne" / "tsne.parquet").to_pydict()
    assert set(points["model"]) == {"untrained", "ISS", "TLM (BM25)"}
    assert np.isfinite(points["x"]).all() and np.isfinite(points["y"]).all()
    assert json.loads(tsne.stdout)["analysis-tsne"]["samples"] * 3 == len(points["x"])

    layers = iss_command("analyze", "layers", str(config_file), "--quiet", "--json", *tiny)
    assert layers.returncode == 0, layers.stderr[-3000:]
    summaries = json.loads(layers.stdout)
    table = json.loads((run_dir / "analysis-layers" / "layers.json").read_text())
    assert [row["layer"] for row in table] == ["embeddings", "block 1", "block 2 (last)"]
    influences = ("influence-layerembeddings", "influence-layer1", "influence")
    assert [summaries[name]["layer"] for name in influences] == ["embeddings", "block1", "block2"]
    for row, influence in zip(table, influences, strict=True):
        finetunes = [summaries[f"finetune-iss{tag}-seed{s}"] for s in (0, 1) for tag in _layer_tags(row["layer"])]
        assert row["test_mean"] == pytest.approx(np.mean([f["test"] for f in finetunes]) * 100)
        assert row["selection_seconds"] >= summaries[influence]["seconds"] > 0

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["influence"]["layer"] == "last"  # the run's config, not the last variant's

    report = iss_command("report", str(run_dir), "--json")
    assert report.returncode == 0, report.stderr[-3000:]
    summary = json.loads(report.stdout)
    assert summary["figures"] == 5  # sources, scores, words, t-SNE, layers
    html = Path(summary["html"]).read_text()
    assert "<img" in html and 'src="data:image/png;base64,' in html and 'src="/' not in html  # self-contained
    markdown = Path(summary["markdown"]).read_text()
    assert "## Timings" in markdown and all((Path(summary["markdown"]).parent / f).is_file() for f in ("scores.png",))
    assert "jaccard_iss" in markdown and "jaccard_tlm" in markdown  # each subset's overlap with ISS's and TLM's
    assert "Verdict: positive control" in markdown and "not read: no positive control" in markdown
    _render_in_chromium(Path(summary["html"]), summary["sections"])


def _layer_tags(layer: str) -> list[str]:
    return [""] if layer.endswith("(last)") else [f"@layer{layer.removeprefix('block ')}"]


def _render_in_chromium(html: Path, sections: list[str]) -> None:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(html.resolve().as_uri())
        assert page.locator("h2").all_inner_texts() == sections
        widths = page.evaluate("[...document.images].map(image => image.complete ? image.naturalWidth : 0)")
        assert len(widths) == 5 and min(widths) > 100  # every plot decoded
        assert page.locator("table").count() >= 6
        assert "ISS" in page.locator("table").first.inner_text()  # results table with the ISS row
        page.screenshot(path=str(html.with_name("screenshot.png")), full_page=True)
        browser.close()
    assert html.with_name("screenshot.png").stat().st_size > 50_000
