"""How long ``iss run`` will take, said before any stage runs, and again once the BM25 pool exists.

Every stage declares its own work (:mod:`iss.stages`: a :class:`~iss.stages.price.Price`, the tokens its batches
really hold, padding included, with the run's own batching: length buckets, packing, task/subset micro-batch
schedule); this module measures the run's inputs once (:class:`~iss.stages.price.Workload`) and sums the prices,
each priced by probes of this machine: a
few training steps of the run's own model on one warm-up batch, with MLM + task loss on the blocks warm-up and
pretraining train, and with the task loss alone on the fine-tuned parameters (fine-tuning). Forward-only work
(evaluation, the influence stage's candidate pass) is priced relative to a whole-model training step with factors
measured by ``benchmarks/bench_influence.py``. Each kind of stage is then scaled by what earlier runs of the same
model on this machine took against their probes (:class:`Calibration`). It is an estimate for a fresh run folder:
stages that are already finished are reused and cost nothing.

Before any stage the pool is a forecast (:func:`forecast_pool_lengths`): its size from the BM25 hits the config
asks for, its lengths from the corpus's first documents, both scaled by what this machine's earlier runs
measured (:class:`Calibration`); after retrieval the real pool replaces it.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from iss.config.schema import IssConfig
from iss.data.corpus import iter_corpus
from iss.data.task import TaskData, load_task
from iss.modeling.batches import labelled_batch, language_batch, per_sample_lm_loss, per_sample_task_loss, token_counts
from iss.modeling.frozen import FrozenBlockFeatures
from iss.modeling.model import set_trainable
from iss.modeling.precision import forward_autocast
from iss.pipeline.calibration import INPUT_STAGES, Calibration, corpus_key, hits_key, model_key
from iss.retrieval.bm25 import read_pool
from iss.runs.folder import write_json
from iss.stages import influence, mechanism, select, train, warmup
from iss.stages.inputs import make_tokenizer, read_tokenizer, task
from iss.stages.plan import RunPlan
from iss.stages.price import Price, Workload
from iss.stages.retrieval import pool_token_counts, retrieval
from iss.training.loop import encoded_lengths

if TYPE_CHECKING:
    from iss.stages.context import StageContext

PROBE_STEPS = 5  # the fastest counts: a transient load on the machine slows some steps, never speeds one up
ESTIMATE_FILE = "estimate.json"
FORECAST_FILE = "estimate-forecast.json"  # the estimate made before any stage ran
CORPUS_HEAD_DOCS = 1000  # the corpus's first documents, whose lengths stand for the pool's before it exists


@dataclass(frozen=True)
class RunEstimate:
    """Estimated seconds per kind of stage, and how many stages of that kind the run has."""

    seconds: dict[str, float]
    runs: dict[str, int]
    seconds_per_token: dict[str, float]  # per probe (see probe_settings)
    forecast: bool = False  # the pool forecast, not measured (before retrieval)
    unpriced: tuple[str, ...] = ()  # kinds of stage nothing measured yet prices (a corpus never read here)
    factors: dict[str, float] = field(default_factory=dict)  # per probed kind: the calibration applied

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def save(self, path: Path) -> None:
        """``estimate.json`` in the run folder: what was predicted, to hold against the manifest's timings."""
        path.parent.mkdir(parents=True, exist_ok=True)  # before any stage the run folder may not exist yet
        write_json(path, {**asdict(self), "total": self.total})

    @classmethod
    def load(cls, path: Path) -> RunEstimate:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            saved["seconds"], saved["runs"], saved["seconds_per_token"], saved.get("forecast", False),
            tuple(saved.get("unpriced", ())), saved.get("factors", {}),
        )  # fmt: skip

    def against(self, manifest: dict, plan: RunPlan) -> dict[str, dict[str, float]]:
        """Estimated vs measured seconds per kind of stage, the measured ones summed over the plan's stages in a
        run's manifest (each stage's own timing, kept when a later run reuses it)."""
        stages = manifest.get("stages", {})
        measured = {
            kind: sum(float(stages.get(name, {}).get("summary", {}).get("seconds", 0.0)) for name in names)
            for kind, names in plan.stages_by_kind().items()
            if kind in self.seconds
        }
        rows = {kind: {"estimated": self.seconds[kind], "measured": measured.get(kind, 0.0)} for kind in self.seconds}
        rows["total"] = {"estimated": self.total, "measured": sum(measured.values())}
        return rows

    def against_with_forecast(
        self, forecast: RunEstimate, manifest: dict, plan: RunPlan
    ) -> dict[str, dict[str, float | None]]:
        """:meth:`against` for this estimate (made once the pool existed), each kind also with what ``forecast`` said
        before any stage and the calibration factor this estimate applied (None: none recorded)."""
        rows: dict[str, dict[str, float | None]] = dict(self.against(manifest, plan))
        said_before = forecast.against(manifest, plan)
        for kind, row in rows.items():
            row["forecast"] = said_before.get(kind, {}).get("estimated", 0.0)
            row["factor"] = self.factors.get(kind)
        return rows

    def describe(self) -> str:
        parts = ", ".join(
            f"{kind} {seconds / 60:.1f}" + (f" ({self.runs[kind]} runs)" if self.runs.get(kind, 1) > 1 else "")
            for kind, seconds in self.seconds.items()
            if seconds > 0
        )
        when = "before any stage, pool forecast" if self.forecast else "with the BM25 pool"
        if any(factor != 1.0 for factor in self.factors.values()):
            when += "; stages scaled by an earlier run of this model here"
        unpriced = f"; not priced yet: {', '.join(self.unpriced)}" if self.unpriced else ""
        return (
            f"estimated time for a fresh run folder ({when}): {self.total / 60:.1f} min on this machine "
            f"({parts}; minutes{unpriced})"
        )


def probe_settings(config: IssConfig) -> dict[str, tuple[str, int | None]]:
    """The probes an estimate times, each as (objective, the top blocks its steps train; None: all): ``joint`` (LM
    + task loss on the whole model, which also prices forward-only passes), ``warm-up`` and ``pretraining`` (LM +
    task loss on what those stages train; backward stops at their lowest trainable block), ``task`` (fine-tuning)."""
    return {
        "joint": ("joint", None),
        "warm-up": ("joint", config.warmup.trainable_blocks),
        "pretraining": ("joint", config.pretrain.trainable_blocks),
        "task": ("task", config.finetune.trainable_blocks),
    }


def probe_seconds_per_token(
    context: StageContext,
    task_data: TaskData,
    tokenizer,
    texts: list[str],
    labels: np.ndarray,
    objective: str,
    blocks: int | None = None,
) -> float:
    """Seconds per (padded) token of a training step of the run's model on one batch of task texts, training its
    top ``blocks`` (all: None): with MLM + task loss (``joint``), or with the task loss alone (``task``)."""
    config, device = context.config, context.device
    model = warmup.initial_model(context, task_data, tokenizer, config.seed, fitted_head=False).to(device)
    set_trainable(model, config.model.freeze_embeddings, blocks)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rows = np.arange(min(len(texts), config.warmup.batch_size))
    batch = labelled_batch(tokenizer, [texts[i] for i in rows], labels[rows], config.model.max_length)
    batch = language_batch(model, tokenizer, batch, 0.15, config.seed, rows).to(device)
    cache = FrozenBlockFeatures(model, blocks) if objective == "task" and config.finetune.cache_frozen_blocks else None
    if cache:  # fine-tuning's steps then run the top blocks on cached states
        batch_texts = [texts[i] for i in rows]
        states = cache.encode(tokenizer, batch_texts, config.model.max_length, device, len(rows))
        model.train()
    timings = []
    for _ in range(PROBE_STEPS + 1):  # the first step warms up allocators and kernels and is not counted
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with forward_autocast(device):
            if cache:
                loss = torch.nn.functional.cross_entropy(cache.logits(states, device), batch.labels)
            else:
                loss = per_sample_task_loss(model, batch).mean()
            if objective == "joint":
                loss = loss + per_sample_lm_loss(model, batch).mean()
        loss.backward()
        optimizer.step()
        timings.append(time.perf_counter() - start)
    return float(np.min(timings[1:])) / batch.input_ids.numel()


def measure_workload(context: StageContext, task_data: TaskData, tokenizer, pool_lengths: np.ndarray) -> Workload:
    """The run's inputs as its stages price them: the task's splits encoded with the run's tokenizer, the pool's
    lengths (real or forecast), the model's blocks."""
    max_length = context.config.model.max_length
    split_tokens = {
        split: int(encoded_lengths(tokenizer, task_data.texts(split), max_length).sum())
        if split in task_data.splits
        else 0
        for split in ("dev", "test")
    }
    train_texts = task_data.texts("train")
    train_lengths = encoded_lengths(tokenizer, train_texts, max_length)
    return Workload(context.config, tokenizer, train_texts, train_lengths, split_tokens, pool_lengths, context.blocks())


def stage_prices(work: Workload) -> list[Price]:
    """Every probed kind of stage's declared price (:mod:`iss.stages`), in the order the run makes them."""
    head = warmup.head_price(work)
    return [
        *([head] if head else []),
        warmup.warmup_price(work),
        influence.price(work),
        train.pretrain_price(work),
        train.finetune_price(work),
        mechanism.price(work),
    ]


def estimate_run(
    context: StageContext, with_pool: bool = False, seconds_per_token: dict[str, float] | None = None
) -> RunEstimate:
    """Price ``Pipeline.run_all()`` for a fresh run folder: the stages' declared prices (tokens per probe) times
    this machine's probes (seconds per token) times its calibration. By default before any stage runs: the task
    is read and the tokenizer made (or taken from the cache) in memory, and the pool is forecast. ``with_pool``
    reads the retrieval stage's pool (running it if needed) and prices the input stages by their measured
    seconds; ``seconds_per_token`` reuses the probes of an earlier estimate."""
    config = context.config
    task_data = task(context) if with_pool else load_task(config.task, config.seed)
    tokenizer = read_tokenizer(context) if with_pool else make_tokenizer(context, task_data)[0]
    train_texts, labels = task_data.texts("train"), task_data.label_ids("train")
    per_token = seconds_per_token
    if per_token is None:  # one probe per distinct setting: without trainable_blocks they are two
        settings = probe_settings(config)
        timed = {
            setting: probe_seconds_per_token(context, task_data, tokenizer, train_texts, labels, *setting)
            for setting in dict.fromkeys(settings.values())
        }
        per_token = {probe: timed[setting] for probe, setting in settings.items()}

    calibration = Calibration.load()
    corpus = None if with_pool else corpus_key(config)  # what the forecast reads of earlier runs on this corpus
    if with_pool:
        pool = read_pool(retrieval(context).path, ["text"]).column("text").to_pylist()
        pool_lengths = encoded_lengths(tokenizer, pool, config.model.max_length)
    else:
        pool_lengths = forecast_pool_lengths(config, tokenizer, len(train_texts), calibration, corpus)
    work = measure_workload(context, task_data, tokenizer, pool_lengths)

    prices = stage_prices(work)
    priced = {p.kind: sum(float(t) * per_token[probe] for probe, t in p.tokens.items()) for p in prices}
    runs = {p.kind: p.runs for p in prices}
    factors = {kind: calibration.stage_factor(model_key(config), kind) for kind in priced}
    priced = {kind: t * factors[kind] for kind, t in priced.items()}
    # what is not priced per token: the input stages (measured once they ran; before, what they took in this
    # machine's last run on this corpus) and each selection (calibrated on this machine's earlier runs)
    stages, unpriced = work.plan.stages_by_kind(), []
    if with_pool:
        priced[INPUT_STAGES] = sum(
            float(context.results[name].summary.get("seconds", 0)) for name in stages[INPUT_STAGES]
        )
    elif corpus in calibration.input_seconds:
        priced[INPUT_STAGES] = calibration.input_seconds[corpus]
    else:
        unpriced.append(INPUT_STAGES)
    selections = select.price(work)
    priced[selections.kind] = selections.runs * calibration.select_seconds
    runs[selections.kind] = selections.runs
    return RunEstimate(priced, runs, per_token, not with_pool, tuple(unpriced), factors)


def corpus_head_counts(config: IssConfig, tokenizer) -> np.ndarray:
    """Token counts of the corpus's first documents (as the mixture keeps them): a sample read in a moment."""
    batches = iter_corpus(config.corpus, batch_size=CORPUS_HEAD_DOCS)
    texts = list(itertools.islice((text for batch in batches for text in batch.texts if text), CORPUS_HEAD_DOCS))
    return token_counts(tokenizer, texts)


def forecast_pool_lengths(
    config: IssConfig, tokenizer, queries: int, calibration: Calibration, corpus: str
) -> np.ndarray:
    """Encoded lengths of the pool BM25 will make: queries x top_k hits times the share of unique documents, at
    most the documents of ``corpus`` (a :func:`corpus_key`) where an earlier run counted them, with lengths drawn
    from the corpus's first documents scaled by how much longer pool documents were in earlier runs (BM25 favours
    long documents)."""
    share = calibration.pool_shares.get(hits_key(corpus, config.retrieval.top_k), calibration.pool_share)
    docs = round(queries * config.retrieval.top_k * share)
    if calibration.corpus_size.get(corpus):
        docs = min(docs, calibration.corpus_size[corpus])
    counts = corpus_head_counts(config, tokenizer) * calibration.pool_length_ratio
    specials = tokenizer.num_special_tokens_to_add()
    lengths = np.minimum(np.round(counts).astype(np.int64) + specials, config.model.max_length)
    return np.random.default_rng(config.seed).choice(lengths, size=max(1, docs))


def learn_from_run(context: StageContext, manifest: dict) -> Calibration:
    """Calibrate on a finished run: its manifest, how much longer its pool's documents are than the corpus's
    first ones (both counted with the run's tokenizer), and its stages against its estimate (``estimate.json``)."""
    config = context.config
    pool, tokenizer = pool_token_counts(context), read_tokenizer(context)
    head = corpus_head_counts(config, tokenizer)
    ratio = float(pool.mean() / head.mean()) if len(pool) and len(head) and head.mean() > 0 else None
    saved = context.run.root / ESTIMATE_FILE
    estimate = RunEstimate.load(saved) if saved.is_file() else None
    return Calibration.learn(manifest, RunPlan(config), corpus_key(config), ratio, estimate)
