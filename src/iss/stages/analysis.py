"""The paper's analyses as stages over a run folder.

* words  -- PMI between words and labels on the task's training texts; the top task-influential words and
  their frequency in each selected subset and in the whole corpus (Table 6).
* tsne   -- t-SNE of the [CLS] features of the task's test texts under the ISS-pretrained, TLM-pretrained
  and untrained models (Figure 4), with a silhouette score per model so the picture has a number behind it.
* layers -- select with the gradients of the embeddings and of each block, pretrain and fine-tune on each
  subset, and compare F1 and selection time per layer (Figure 3, Table 7).

Each writes its numbers (CSV/JSON/Markdown) and a PNG into its own artifact folder, so `iss report` can
collect them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score

from iss.comparison.stats import sample_std
from iss.comparison.tables import save_figure, write_rows
from iss.config.schema import CorpusConfig
from iss.data.corpus import iter_corpus
from iss.errors import ConfigError
from iss.modeling.layers import resolve_layer
from iss.modeling.model import TaskModel
from iss.selection.methods import display_name
from iss.selection.subset import read_subset_texts
from iss.stages.plan import select_stage
from iss.training.finetuning import pooled_features

if TYPE_CHECKING:
    from iss.pipeline.run import Pipeline
    from iss.runs.folder import StageResult

WORD_PATTERN = r"(?u)\b[a-zA-Z][a-zA-Z\-]+\b"  # words of two or more letters (hyphens kept: "anti-cancer")


# --------------------------------------------------------------------------------------------- words


def label_pmi(
    texts: list[str], label_ids: np.ndarray, n_labels: int, min_docs: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """PMI(w, y) = log p(w, y) / (p(w) p(y)), a word counted once per text; -inf where w never meets y.

    Returns the words seen in at least ``min_docs`` texts (English stop words dropped), their PMI matrix
    [words, labels] and the joint text counts behind it.
    """
    vectorizer = CountVectorizer(binary=True, token_pattern=WORD_PATTERN, stop_words="english", min_df=min_docs)
    try:
        presence = vectorizer.fit_transform(texts)
    except ValueError as error:  # sklearn: "After pruning, no terms remain"
        raise ConfigError(f"no word occurs in {min_docs} task texts; lower analysis.min_word_docs") from error
    onehot = sp.csr_matrix((np.ones(len(label_ids)), (np.arange(len(label_ids)), label_ids)), (len(texts), n_labels))
    joint = np.asarray((presence.T @ onehot).todense())
    doc_freq = np.asarray(presence.sum(axis=0)).ravel()
    label_freq = np.bincount(label_ids, minlength=n_labels)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(joint * len(texts) / (doc_freq[:, None] * label_freq[None, :]))
    return vectorizer.get_feature_names_out().tolist(), pmi, joint


def top_words(
    words: list[str], pmi: np.ndarray, joint: np.ndarray, labels: list[str], n: int, min_joint: int = 1
) -> list[dict]:
    """The ``n`` words with the highest PMI to a label they meet in at least ``min_joint`` texts (a word seen
    once with a rare label would otherwise top the list); ties: more texts first, then alphabetical."""
    eligible = np.where(joint >= min_joint, pmi, -np.inf)
    best = eligible.argmax(axis=1)
    rows = [i for i in range(len(words)) if np.isfinite(eligible[i, best[i]])]
    order = sorted(rows, key=lambda i: (-pmi[i, best[i]], -joint[i, best[i]], words[i]))[:n]
    return [
        {"word": words[i], "label": labels[best[i]], "pmi": float(pmi[i, best[i]]), "task_docs": int(joint[i, best[i]])}
        for i in order
    ]


def word_counts(batches: Iterable[list[str]], words: list[str]) -> tuple[np.ndarray, int]:
    """Occurrences of each of ``words`` (case-insensitive, whole words) and the total word count."""
    vectorizer = CountVectorizer(token_pattern=WORD_PATTERN, vocabulary=words)
    pattern = re.compile(WORD_PATTERN)
    counts, total = np.zeros(len(words), np.int64), 0
    for texts in batches:
        counts += np.asarray(vectorizer.transform(texts).sum(axis=0)).ravel()
        total += sum(len(pattern.findall(text)) for text in texts)
    return counts, total


def plot_words(rows: list[dict], sources: list[str], path: Path) -> None:
    """Grouped horizontal bars: frequency per 10k words of each top word in each subset and the corpus."""
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    height = 0.8 / len(sources)
    positions = np.arange(len(rows))
    for offset, source in enumerate(sources):
        values = [row[f"{source}_per_10k"] for row in rows]
        ax.barh(positions + offset * height, values, height, label=display_name(source))
    ax.set_yticks(positions + height * (len(sources) - 1) / 2, [f"{r['word']} ({r['label']})" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("occurrences per 10k words")
    ax.set_title("Task-influential words (highest PMI with a label)")
    ax.legend()
    save_figure(fig, path)


def analyze_words(pipeline: Pipeline) -> StageResult:
    """Table 6: the top PMI words of the task and how often each subset and the corpus use them."""
    config, settings = pipeline.config, pipeline.config.analysis
    methods = [m for m in config.evaluation.methods if m != "none"]
    subsets = {method: pipeline.method_variant(method).select() for method in methods}
    data = pipeline.data()

    def body(folder: Path, summary: dict) -> None:
        task = pipeline.task()
        words, pmi, joint = label_pmi(
            task.texts("train"), task.label_ids("train"), len(task.labels), settings.min_word_docs
        )
        rows = top_words(words, pmi, joint, task.labels, settings.words, settings.min_word_docs)
        if not rows:
            raise ConfigError(f"no word occurs in {settings.min_word_docs} train texts of one label; lower "
                             "analysis.min_word_docs")  # fmt: skip
        chosen = [row["word"] for row in rows]
        totals = {}
        for method, stage in subsets.items():
            texts = read_subset_texts(stage.path)
            counts, totals[method] = word_counts([texts], chosen)
            _add_frequencies(rows, method, counts, totals[method])
        with pipeline.progress(None, "corpus word counts") as bar:
            counts, totals["corpus"] = word_counts(_corpus_texts(config.corpus, bar.update), chosen)
        _add_frequencies(rows, "corpus", counts, totals["corpus"])
        write_rows(rows, folder / "words")
        plot_words(rows, [*subsets, "corpus"], folder / "words.png")
        summary.update({"words": len(rows), "vocabulary": len(words), "total_words": totals})

    parts = {
        "analysis": settings.model_dump(mode="json", include={"words", "min_word_docs"}),
        "data": data.fingerprint,
        "subsets": {method: stage.fingerprint for method, stage in subsets.items()},
        "corpus": pipeline.corpus_signature(),
    }
    return pipeline.stage("analysis-words", parts, body)


def _corpus_texts(corpus: CorpusConfig, progress: Callable[[int], object]) -> Iterator[list[str]]:
    for batch in iter_corpus(corpus):
        progress(len(batch.texts))
        yield batch.texts


def _add_frequencies(rows: list[dict], source: str, counts: np.ndarray, total: int) -> None:
    for row, count in zip(rows, counts, strict=True):
        row[f"{source}_count"] = int(count)
        row[f"{source}_per_10k"] = float(count) / max(total, 1) * 1e4


# ---------------------------------------------------------------------------------------------- t-SNE


def tsne_embed(features: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """2-D t-SNE of the rows of ``features`` (perplexity capped below the sample count, as sklearn requires)."""
    perplexity = min(perplexity, max(1.0, (len(features) - 1) / 3))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def label_separation(features: np.ndarray, labels: np.ndarray) -> float:
    """Cosine silhouette of the labels in feature space: higher = classes lie further apart (nan if undefined)."""
    if not 2 <= len(np.unique(labels)) < len(labels):
        return float("nan")
    return float(silhouette_score(features, labels, metric="cosine"))


def plot_tsne(points: dict[str, np.ndarray], labels: np.ndarray, names: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, len(points), figsize=(4.5 * len(points), 4.5), squeeze=False)
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")  # one colour per label
    for ax, (model, xy) in zip(axes[0], points.items(), strict=True):
        for label_id, name in enumerate(names):
            mine = labels == label_id
            if mine.any():
                ax.scatter(xy[mine, 0], xy[mine, 1], s=6, label=name, color=colours(label_id % colours.N))
        ax.set_title(model)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize="small", markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    save_figure(fig, path)


def analyze_tsne(pipeline: Pipeline) -> StageResult:
    """Figure 4: [CLS] features of the test texts under the ISS-, TLM-pretrained and untrained models."""
    config, settings, seed = pipeline.config, pipeline.config.analysis, pipeline.config.seed
    pretrained = {
        display_name(method): pipeline.variant({"selection.method": method}).pretrain(seed) for method in ("iss", "tlm")
    }
    data, tokenizer_stage = pipeline.data(), pipeline.tokenizer()

    def body(folder: Path, summary: dict) -> None:
        task = pipeline.task()
        split = "test" if "test" in task.splits and task.splits["test"].num_rows else "dev"
        texts, labels = task.texts(split), task.label_ids(split)
        keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[: settings.tsne_samples])
        texts, labels = [texts[i] for i in keep], labels[keep]
        tokenizer = pipeline.read_tokenizer(tokenizer_stage.path)
        models = {"untrained": pipeline.initial_model(task, tokenizer, seed)}
        models.update({name: TaskModel.load(stage.path / "model") for name, stage in pretrained.items()})
        points, separation, columns = {}, {}, {"model": [], "x": [], "y": [], "label_id": []}
        bar = pipeline.progress(len(models), "features + t-SNE", unit="model")
        for name, model in models.items():
            model = model.to(pipeline.device)
            features = pooled_features(model, tokenizer, texts, config.model.max_length, pipeline.device).numpy()
            points[name] = tsne_embed(features, settings.perplexity, seed)
            bar.update()
            separation[name] = label_separation(features, labels)
            columns["model"] += [name] * len(texts)
            columns["x"] += points[name][:, 0].tolist()
            columns["y"] += points[name][:, 1].tolist()
            columns["label_id"] += labels.tolist()
        bar.close()
        pq.write_table(pa.table(columns), folder / "tsne.parquet")
        plot_tsne(points, labels, task.labels, folder / "tsne.png")
        (folder / "separation.json").write_text(json.dumps(separation, indent=2), encoding="utf-8")
        summary.update({"split": split, "samples": len(texts), "silhouette": separation})

    parts = {
        "analysis": settings.model_dump(mode="json", include={"tsne_samples", "perplexity"}),
        "seed": seed,
        "pretrained": {name: stage.fingerprint for name, stage in pretrained.items()},
        "model": config.model.model_dump(mode="json"),
        "data": data.fingerprint,
        "tokenizer": tokenizer_stage.fingerprint,
    }
    return pipeline.stage("analysis-tsne", parts, body)


# --------------------------------------------------------------------------------------------- layers


def plot_layers(rows: list[dict], metric: str, path: Path) -> None:
    """F1 (mean and std over seeds) and selection time for each layer the gradients were taken at."""
    names = [row["layer"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(names, [row["test_mean"] for row in rows], yerr=[row["test_std"] for row in rows], capsize=4)
    left.set_ylabel(f"test {metric} x100")
    left.set_title("End-task score by influence layer")
    right.bar(names, [row["selection_seconds"] for row in rows], color="tab:orange")
    right.set_ylabel("seconds (influence + selection)")
    right.set_title("Selection cost by influence layer")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=30)
    save_figure(fig, path)


def analyze_layers(pipeline: Pipeline) -> StageResult:
    """Figure 3 / Table 7: one ISS selection per layer, each pretrained and fine-tuned over the seeds."""
    config = pipeline.config
    warmup = pipeline.warmup()
    n_blocks = pipeline.blocks()  # from the checkpoint's config (or the config's size): no model loaded
    layers = config.analysis.layers or ["embeddings", *range(1, n_blocks + 1)]
    rows, fingerprints = [], []
    for layer in layers:
        last = resolve_layer(layer, n_blocks).is_last
        variant = pipeline.variant(
            {"influence.layer": "last" if last else layer, "selection.method": "iss"}, "" if last else f"@layer{layer}"
        )
        runs = [variant.finetune(seed, pretrain_seed=pretrain) for pretrain, seed in config.seed_pairs()]
        influence, selected = variant.results[variant.influence_name], variant.results[select_stage("iss", variant.tag)]
        scores = np.array([run.summary["test"] for run in runs]) * 100
        rows.append(
            {
                "layer": f"block {layer} (last)" if last else (f"block {layer}" if layer != "embeddings" else layer),
                "parameters": influence.summary["group_parameters"],
                "test_mean": float(scores.mean()),
                "test_std": sample_std(scores),
                "seeds": len(runs),
                "influence_seconds": influence.summary["seconds"],
                "selection_seconds": influence.summary["seconds"] + selected.summary["seconds"],
                "subset_docs": selected.summary["docs"],
            }
        )
        fingerprints.append([run.fingerprint for run in runs])

    def body(folder: Path, summary: dict) -> None:
        write_rows(rows, folder / "layers")
        plot_layers(rows, config.task.metric, folder / "layers.png")
        summary.update({"layers": [row["layer"] for row in rows], "warmup_seconds": warmup.summary["seconds"]})

    return pipeline.stage("analysis-layers", {"runs": fingerprints}, body)
