"""The selection pipeline as stages over a run folder: data -> tokenizer -> retrieval -> warmup -> influence
-> selection. Each stage reads its upstream artifacts from disk, writes its own, and is skipped when an
artifact with the same fingerprint (its config + upstream fingerprints + input files) is already there.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterator
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import transformers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from iss.config import Budget, IssConfig, fingerprint_dump
from iss.data import TaskData, corpus_files, iter_corpus, load_task, read_task, save_task
from iss.distributed import ray_bm25_search, ray_score_pool
from iss.engine import StageEngine
from iss.errors import ConfigError
from iss.evaluation import finetune as finetune_model
from iss.evaluation import head_scores
from iss.family import Checkpoint, Family, resolve_family
from iss.frozen import FrozenStates
from iss.influence import InfluenceResult, InfluenceScorer
from iss.layers import resolve_layer
from iss.methods import EVALUATED, SELECTION, Candidates
from iss.model import TaskModel, pick_device, precision, set_head_trainable, set_trainable, token_counts
from iss.parallel import processes
from iss.plan import (
    RunPlan,
    evaluate_stage,
    finetune_stage,
    influence_stage,
    mechanism_stage,
    pretrain_stage,
    select_stage,
)
from iss.report import write_results
from iss.retrieval import BM25Index, collect_pool, query_order, read_hits, read_pool, write_retrieval
from iss.runs import RunFolder, StageResult, file_signature
from iss.selection import (
    RankedLists,
    bm25_lists,
    corpus_sample,
    read_subset_ids,
    read_subset_texts,
    resolve_budget,
    round_robin,
    source_shares,
    subset_table,
    wanted_docs,
    with_overlaps,
    write_subset,
)
from iss.selectors import text_candidates
from iss.stats import sample_std
from iss.tokenization import cached_tokenizer, load_tokenizer
from iss.training import pretrain as pretrain_model
from iss.training import unigram_entropy, warmup_train

log = logging.getLogger("iss")
HEAD_SAMPLE_SEED_OFFSET = 7919  # a base adapted with mlm_head_blocks reads a sample of its own


class Pipeline:
    """Runs (or reuses) the stages of one config in its run folder."""

    def __init__(self, config: IssConfig, show_progress: bool = True, tag: str = "") -> None:
        self.config = config
        self.tag = tag  # suffix of selection/pretrain/fine-tune stage names (budget sweep, layer ablation)
        self.run = RunFolder(config.run_dir)
        self.show_progress = show_progress and processes().is_main
        self.device = processes().device(pick_device(config.device))
        self.results: dict[str, StageResult] = {}
        # the frozen lower blocks' states, shared by fine-tunings of models with the same frozen weights
        self.frozen_states = FrozenStates.for_config(config)
        self.pool_lengths: dict[tuple[str, str], np.ndarray] = {}  # token counts of a pool, shared by variants
        self.base_config = config  # what the manifest records: the run's own config, not a variant's
        if not self.show_progress:
            transformers.utils.logging.disable_progress_bar()

    # ------------------------------------------------------------------------------------------ helpers

    def stage(
        self, name: str, parts: dict, body: Callable[[Path, dict], None], data_parallel: bool = False
    ) -> StageResult:
        """Reuse the finished artifact ``name`` if its fingerprint matches ``parts``, else run ``body`` into it
        (:class:`iss.engine.StageEngine`); the manifest records the run's own config."""
        engine = StageEngine(self.run, self.results, lambda: precision(self.config.precision))
        return engine.run(name, parts, body, data_parallel, {"config": self.base_config.model_dump(mode="json")})

    def progress(self, total: int | None, desc: str, unit: str = "doc") -> tqdm:
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.show_progress, leave=False)

    @cached_property
    def family(self) -> Family:
        """The model family (encoder or causal), as configured or read from the checkpoint's config."""
        model = self.config.model
        checkpoint = Checkpoint.at(model.path) if model.path else None
        return resolve_family(model.family, checkpoint, model.trust_remote_code)

    def read_tokenizer(self, path: str | Path | None = None):
        """The run's tokenizer (the tokenizer stage's, or the one at ``path``), ready for the model's family."""
        path = path or self.tokenizer().path
        return load_tokenizer(path, self.family, self.config.model.trust_remote_code)

    def variant(self, overrides: dict, tag: str = "") -> Pipeline:
        """The same run folder under changed settings (another method, budget or layer), sharing finished
        stages; ``tag`` keeps its selection/pretrain/fine-tune artifacts apart from the default ones."""
        pipeline = Pipeline(self.config.with_overrides(overrides), self.show_progress, tag)
        pipeline.results, pipeline.base_config, pipeline.pool_lengths, pipeline.frozen_states = (
            self.results,
            self.base_config,
            self.pool_lengths,
            self.frozen_states,
        )
        return pipeline

    def method_variant(self, name: str, budget: Budget | str | None = None, budget_tag: str = "") -> Pipeline:
        """The pipeline of one evaluated method (``iss-cosine``, ``random-corpus``, ...; see iss.methods)."""
        method = EVALUATED[name]
        overrides = dict(method.overrides)
        if method.selection is not None:
            overrides["selection.method"] = method.selection
            if budget is not None:
                overrides["selection.budget"] = budget.model_dump() if isinstance(budget, Budget) else budget
        return self.variant(overrides, method.tag + budget_tag)

    @property
    def influence_name(self) -> str:
        return influence_stage(self.config.influence)

    def task(self) -> TaskData:
        return read_task(self.data().path, self.config.task.name)

    def corpus_signature(self) -> dict:
        corpus = self.config.corpus
        files = [str(file) for file in corpus_files(corpus)]  # hub names and saved datasets resolved
        return {"corpus": fingerprint_dump(corpus), "files": file_signature(files)}

    def initial_model(self, task: TaskData, tokenizer, seed: int, fitted_head: bool = True) -> TaskModel:
        """A fresh model sized by the config (from scratch) or the local checkpoint (further pretraining), with
        its fitted MLM head when ``model.mlm_head_steps`` asks for one (unless ``fitted_head`` is off: the same
        architecture, for timing it before the fit runs); a fresh task head either way."""
        config = self.config
        torch.manual_seed(seed)
        if not config.model.path:
            return TaskModel.from_scratch(config.model, tokenizer, len(task.labels))
        self.check_tokenizer(len(tokenizer))  # before the head fit too
        head = self.mlm_head() if fitted_head else None
        path = head.path / "model" if head else config.model.path
        return TaskModel.load(path, len(task.labels), config.model.trust_remote_code, self.family)

    # ----------------------------------------------------------------------- checks before spending

    def checkpoint_config(self) -> transformers.PretrainedConfig | None:
        """The checkpoint's config (``model.path``), read without its weights; None from scratch."""
        if not self.config.model.path:
            return None
        return Checkpoint.at(self.config.model.path).config(self.config.model.trust_remote_code)

    def blocks(self) -> int:
        """Transformer blocks of the model the run trains: the config's size, or the checkpoint's config."""
        checkpoint = self.checkpoint_config()
        return self.config.model.num_layers if checkpoint is None else checkpoint.num_hidden_layers

    def check_tokenizer(self, tokens: int) -> None:
        """A tokenizer of ``tokens`` tokens and a checkpoint with fewer embeddings do not belong together; nor
        rows longer than the checkpoint's context (learned or rotary positions end there)."""
        checkpoint = self.checkpoint_config()
        if checkpoint is None:
            return
        if checkpoint.vocab_size < tokens:
            raise ConfigError(
                f"tokenizer has {tokens} tokens but model {self.config.model.path} only {checkpoint.vocab_size} "
                "embeddings: they do not belong together"
            )
        context = getattr(checkpoint, "max_position_embeddings", None) or getattr(checkpoint, "n_positions", None)
        if context is not None and self.config.model.max_length > context:
            raise ConfigError(
                f"model.max_length {self.config.model.max_length} is longer than {self.config.model.path}'s context "
                f"({context} tokens); longer texts are cut at model.max_length"
            )

    def check_layer(self) -> None:
        """An influence layer the model does not have fails now, not after warm-up."""
        resolve_layer(self.config.influence.layer, self.blocks())

    def pool_token_counts(self) -> np.ndarray:
        """Token counts of the BM25 pool's documents (computed once per pool and tokenizer, shared by variants)."""
        retrieval, tokenizer_stage = self.retrieval(), self.tokenizer()
        key = (retrieval.fingerprint, tokenizer_stage.fingerprint)
        if key not in self.pool_lengths:
            texts = read_pool(retrieval.path, ["text"]).column("text").to_pylist()
            self.pool_lengths[key] = token_counts(self.read_tokenizer(tokenizer_stage.path), texts)
        return self.pool_lengths[key]

    def preflight(self, budgets: list[Budget] | None = None) -> None:
        """Every check the config, the data and the model's config can answer, made before the first expensive
        stage: the tokenizer fits the checkpoint, the influence layer exists, and each budget fits the pool (which
        retrieval makes: a few minutes at most, and the pool is needed anyway)."""
        method = SELECTION[self.config.selection.method]
        if method.check is not None:
            method.check(self.config)
        self.check_tokenizer(len(self.read_tokenizer()))
        if method.needs_influence or self.config.evaluation.mechanism_steps:
            self.check_layer()
        lengths = self.pool_token_counts()
        for budget in budgets or [self.config.selection.budget]:
            resolve_budget(budget, lengths)

    # ------------------------------------------------------------------------------------------- stages

    def data(self) -> StageResult:
        config = self.config

        def body(folder: Path, summary: dict) -> None:
            task = load_task(config.task, config.seed)
            save_task(task, folder)
            summary.update({f"{role}_rows": table.num_rows for role, table in task.splits.items()})
            summary["labels"] = len(task.labels)

        parts = {"task": fingerprint_dump(config.task), "seed": config.seed}
        if Path(config.task.path).exists():
            parts["files"] = file_signature([config.task.path])
        return self.stage("data", parts, body)

    def make_tokenizer(self, task: TaskData) -> tuple[PreTrainedTokenizerFast, bool]:
        """The run's tokenizer: ``tokenizer.path``'s, or one trained on the task and corpus texts (from the cache
        when it was trained on them before). Returns (tokenizer, from cache). The tokenizer stage saves it; the
        time estimate, which runs before any stage, uses it directly."""
        config = self.config
        if config.tokenizer.path:
            return self.read_tokenizer(config.tokenizer.path), False

        def texts() -> Iterator[str]:
            corpus_texts = itertools.islice(
                (text for batch in iter_corpus(config.corpus) for text in batch.texts), config.tokenizer.max_corpus_docs
            )
            task_texts = (task.texts(role) for role in ("train", "dev") if role in task.splits)
            return itertools.chain(*task_texts, corpus_texts)

        return cached_tokenizer(texts, config.tokenizer, config.tokenizer.cache_dir)

    def tokenizer(self) -> StageResult:
        config = self.config
        data = self.data()

        def body(folder: Path, summary: dict) -> None:
            tokenizer, from_cache = self.make_tokenizer(self.task())
            if not config.tokenizer.path:
                summary["from_cache"] = from_cache
            tokenizer.save_pretrained(str(folder))
            summary["vocab_size"] = len(tokenizer)

        parts = {"tokenizer": fingerprint_dump(config.tokenizer), "data": data.fingerprint}
        if not config.tokenizer.path:
            parts["corpus"] = self.corpus_signature()
        return self.stage("tokenizer", parts, body)

    def retrieval(self) -> StageResult:
        config = self.config
        data = self.data()

        def body(folder: Path, summary: dict) -> None:
            queries = self.task().texts("train")
            index = BM25Index(config.retrieval, self.run.work_dir("retrieval"))
            if config.backend == "ray":
                with self.progress(None, "BM25 on Ray (shards)", unit="shard") as bar:
                    hits = ray_bm25_search(
                        index, config.corpus, queries, config.retrieval.top_k, config.ray, bar.update
                    )
            else:
                with self.progress(None, "BM25 index") as bar:
                    index.build(config.corpus, progress=bar.update)
                with self.progress(index.n_docs, "BM25 search") as bar:
                    hits = index.search(queries, config.retrieval.top_k, progress=bar.update)
            pool = collect_pool(hits, config.corpus)
            write_retrieval(folder, hits, pool)
            summary.update(
                {
                    "corpus_docs": index.n_docs,
                    "vocab": int(index.doc_freq.size),
                    "queries": len(queries),
                    "hits": int((hits.ids >= 0).sum()),
                    "pool_docs": pool.num_rows,
                }
            )

        parts = {
            "retrieval": fingerprint_dump(config.retrieval),
            "data": data.fingerprint,
            "corpus": self.corpus_signature(),
        }
        return self.stage("retrieval", parts, body)

    def mlm_head(self) -> StageResult | None:
        """The checkpoint with a fitted MLM head (``model.mlm_head_steps`` > 0), or None.

        all-MiniLM-L6-v2 is saved without its MLM head; a freshly initialised one sends random gradients into the
        encoder for the first steps of every method's further pretraining. Fitting it once, with the encoder
        frozen, on a random sample of the corpus (no method's subset) gives every method the same fitted start.
        The sample is the first documents of the corpus's seeded random order, which the random-corpus control
        takes its subset from too: the head has seen those documents once, the encoder has not.
        """
        config = self.config
        if not config.model.mlm_head_steps:
            return None
        tokenizer_stage = self.tokenizer()
        steps, settings = config.model.mlm_head_steps, config.pretrain

        def body(folder: Path, summary: dict) -> None:
            task = self.task()
            tokenizer = self.read_tokenizer(tokenizer_stage.path)
            torch.manual_seed(config.seed)
            model = TaskModel.load(config.model.path, len(task.labels), config.model.trust_remote_code, self.family)
            set_head_trainable(model, config.model.mlm_head_blocks)
            # the encoder trains on this sample only with mlm_head_blocks: then it is drawn apart from the
            # random-corpus control's sample (another seed), which would otherwise repeat it
            sample_seed = config.seed + (HEAD_SAMPLE_SEED_OFFSET if config.model.mlm_head_blocks else 0)
            sample = self.corpus_sample("docs", steps * settings.batch_size, 0.0, sample_seed)
            sample = sample.column("text").to_pylist()
            update = {"steps": steps, "objective": "mlm", "learning_rate": config.model.mlm_head_learning_rate}
            summary.update(
                pretrain_model(
                    model, tokenizer, sample, task, settings.model_copy(update={**update, "save_every": 0}),
                    config.model.max_length, config.seed, self.device, show_progress=self.show_progress,
                )
            )  # fmt: skip
            summary["sample_docs"] = len(sample)
            model.lm.save_pretrained(str(folder / "model"), safe_serialization=True)  # no task head: each run's own

        parts = {
            "model": fingerprint_dump(config.model),
            "pretrain": fingerprint_dump(
                settings, include={"batch_size", "mlm_probability", "packing", "weight_decay"}
            ),
            "precision": config.precision,
            "seed": config.seed,
            "corpus": self.corpus_signature(),
            "tokenizer": tokenizer_stage.fingerprint,
        }
        return self.stage("mlm-head", parts, body)

    def _start(self) -> dict:
        """Fingerprint parts of a stage whose model starts from ``initial_model``: the fitted head, if any."""
        head = self.mlm_head()
        return {"mlm_head": head.fingerprint} if head else {}

    def warmup(self) -> StageResult:
        config = self.config
        data, tokenizer_stage = self.data(), self.tokenizer()

        def body(folder: Path, summary: dict) -> None:
            task = self.task()
            tokenizer = self.read_tokenizer(tokenizer_stage.path)
            model = self.initial_model(task, tokenizer, config.seed)
            set_trainable(model, config.model.freeze_embeddings, config.warmup.trainable_blocks)
            summary.update(
                warmup_train(
                    model,
                    tokenizer,
                    task,
                    config.warmup,
                    config.model.max_length,
                    config.seed,
                    self.device,
                    self.show_progress,
                )
            )
            summary["parameters"] = sum(p.numel() for p in model.parameters())
            model.save(folder / "model")

        parts = {
            "model": fingerprint_dump(config.model),
            "warmup": fingerprint_dump(config.warmup),
            "precision": config.precision,
            "seed": config.seed,
            "data": data.fingerprint,
            "tokenizer": tokenizer_stage.fingerprint,
            **self._start(),
        }
        return self.stage("warmup", parts, body, data_parallel=True)

    def influence(self) -> StageResult:
        config = self.config
        influence = config.influence
        self.check_layer()
        retrieval, warmup, tokenizer_stage = self.retrieval(), self.warmup(), self.tokenizer()
        name = self.influence_name

        def body(folder: Path, summary: dict) -> None:
            task = self.task()
            scorer = InfluenceScorer.from_pretrained(
                warmup.path / "model", tokenizer_stage.path, influence,
                seed=config.seed, max_length=config.model.max_length, device=self.device,
            )  # fmt: skip
            pool = read_pool(retrieval.path, ["corpus_id", "text"])
            pool_texts = pool.column("text").to_pylist()
            split = influence.task_split
            task_texts = task.texts(split)
            with self.progress(len(task_texts), "task gradients") as bar:
                scorer.fit(
                    task_texts,
                    task.label_ids(split),
                    task.splits[split].column("id").to_pylist(),
                    candidate_probe=pool_texts,
                    progress=bar.update,
                )
            pool_ids = pool.column("corpus_id").to_numpy()
            order = None
            if influence.pool_batch > 1 and influence.pool_grouping == "query":
                order = query_order(read_hits(retrieval.path), pool_ids)
            with self.progress(pool.num_rows, "influence") as bar:
                runner = partial(ray_score_pool, config=config.ray) if config.backend == "ray" else None
                result = scorer.score(
                    pool_texts, pool_ids, self.run.work_dir(name) / "topk.npz", bar.update, runner, order
                )
            result.save(folder)
            summary.update({**scorer.summary(), **result.summary(), "pool_docs": pool.num_rows})

        parts = {
            "influence": fingerprint_dump(influence),
            "precision": config.precision,
            "seed": config.seed,
            "max_length": config.model.max_length,
            "retrieval": retrieval.fingerprint,
            "warmup": warmup.fingerprint,
        }
        return self.stage(name, parts, body)

    def select(self) -> StageResult:
        """Run whatever the configured method needs, then pick the subset under the budget."""
        config = self.config
        method = SELECTION[config.selection.method]
        if method.check is not None:
            method.check(config)
        retrieval, tokenizer_stage = self.retrieval(), self.tokenizer()
        upstream = {"retrieval": retrieval.fingerprint, "tokenizer": tokenizer_stage.fingerprint}
        if method.needs_influence:
            self.preflight()  # a budget over the pool or a missing layer fails before warm-up and influence
        influence = self.influence() if method.needs_influence else None
        if influence is not None:
            upstream[self.influence_name] = influence.fingerprint
        over_corpus = method.rank_texts is not None and config.selection.over == "corpus"
        if method.samples_corpus or over_corpus:
            upstream["corpus"] = self.corpus_signature()
        if method.rank_texts is not None:  # only a text selector's stages are fingerprinted with its settings
            upstream |= {"selectors": fingerprint_dump(config.selectors), "data": self.data().fingerprint}
        selection_dump = fingerprint_dump(config.selection, exclude=set() if over_corpus else {"over"})

        def body(folder: Path, summary: dict) -> None:
            pool = read_pool(retrieval.path)
            tokenizer = self.read_tokenizer(tokenizer_stage.path)
            pool_lengths = self.pool_token_counts()
            kind, limit = resolve_budget(config.selection.budget, pool_lengths)
            if method.rank_texts is not None:
                wanted = wanted_docs(kind, limit, float(pool_lengths.mean()))
                train = self.task().splits["train"]
                pool, lists = method.rank_texts(text_candidates(config, pool, train, wanted, self.device))
                summary.update({"over": config.selection.over, "candidates_kept": pool.num_rows})
            elif method.samples_corpus:
                pool = self.corpus_sample(kind, limit, float(pool_lengths.mean()))
            same_pool = method.rank_texts is None and not method.samples_corpus
            lengths = pool_lengths if same_pool else token_counts(tokenizer, pool.column("text").to_pylist())
            corpus_ids = pool.column("corpus_id").to_numpy()
            doc_tokens = dict(zip(corpus_ids.tolist(), lengths.tolist(), strict=True))
            if method.rank is not None:
                candidates = Candidates(
                    corpus_ids,
                    config.seed,
                    bm25=self.bm25_lists(retrieval.path) if method.needs_hits else None,
                    influence=InfluenceResult.load(influence.path) if influence else None,
                    task_split=config.influence.task_split,
                )
                lists = method.rank(candidates)
            selection = round_robin(lists, doc_tokens, kind, limit, config.seed)
            if not selection.budget_met:
                log.warning(
                    "budget %s not met: the ranked lists ran out after %d docs; raise top_k",
                    config.selection.budget,
                    len(selection.doc_ids),
                )
            subset = subset_table(selection, pool, doc_tokens)
            write_subset(subset, folder)
            summary.update(
                {
                    "method": method.name,
                    "budget": str(config.selection.budget),
                    "budget_unit": kind,
                    "budget_limit": limit,
                    "budget_met": selection.budget_met,
                    "docs": subset.num_rows,
                    "tokens": selection.tokens,
                    "mean_tokens": round(selection.tokens / max(1, subset.num_rows), 2),
                    "sources": source_shares(subset.column("source").to_pylist()),
                    "docs_in_shared_units": sum(1 for mates in subset.column("unit_mates").to_pylist() if mates),
                    "pool_docs": int(pool_lengths.size),
                    "rank_depth": selection.depth,
                    "seed": config.seed,
                }
            )

        parts = {"selection": selection_dump, "seed": config.seed, **upstream}
        return self.stage(select_stage(method.name, self.tag), parts, body)

    def corpus_sample(self, kind: str, limit: int, mean_pool_tokens: float, seed: int | None = None) -> pa.Table:
        """The run's uniform random sample of the whole corpus (:func:`iss.selection.corpus_sample`)."""
        seed = self.config.seed if seed is None else seed
        with self.progress(None, "random corpus sample") as bar:
            return corpus_sample(self.config.corpus, kind, limit, mean_pool_tokens, seed, bar.update)

    def pretrain(self, seed: int | None = None) -> StageResult:
        """Pretrain on the configured method's subset: from scratch (TLM's joint objective) or further."""
        config = self.config
        seed = config.seed if seed is None else seed
        selected, tokenizer_stage, data = self.select(), self.tokenizer(), self.data()
        name = pretrain_stage(config.selection.method, self.tag, seed)

        def body(folder: Path, summary: dict) -> None:
            task = self.task()
            tokenizer = self.read_tokenizer(tokenizer_stage.path)
            subset = read_subset_texts(selected.path)
            model = self.initial_model(task, tokenizer, seed)
            set_trainable(model, config.model.freeze_embeddings, config.pretrain.trainable_blocks)
            checkpoint = self.run.work_dir(name) / "checkpoint"
            summary.update(
                pretrain_model(
                    model,
                    tokenizer,
                    subset,
                    task,
                    config.pretrain,
                    config.model.max_length,
                    seed,
                    self.device,
                    checkpoint,
                    self.show_progress,
                )
            )
            parameters = sum(p.numel() for p in model.lm.parameters())
            summary.update({"subset_docs": len(subset), "parameters": parameters})
            summary["unigram_mlm_level"] = round(unigram_entropy(tokenizer, subset), 4)  # the curve must beat it
            summary["flops"] = 6 * summary["tokens"] * parameters
            model.save(folder / "model")

        parts = {
            "pretrain": fingerprint_dump(config.pretrain),
            "model": fingerprint_dump(config.model),
            "precision": config.precision,
            "seed": seed,
            "selection": selected.fingerprint,
            "tokenizer": tokenizer_stage.fingerprint,
            "data": data.fingerprint,
            **self._start(),
        }
        return self.stage(name, parts, body, data_parallel=True)

    def finetune(
        self, seed: int | None = None, pretrained: bool = True, pretrain_seed: int | None = None
    ) -> StageResult:
        """Fine-tune the pretrained model (or, with ``pretrained=False``, a fresh one) and score dev/test.

        The model was pretrained with ``pretrain_seed``: by default the fine-tuning seed's pair in
        :meth:`IssConfig.seed_pairs` (the same seed, or the config's seed when ``evaluation.repeat_pretraining``
        is off). A pretraining seed other than the fine-tuning seed is named in the stage.
        """
        config = self.config
        seed = config.seed if seed is None else seed
        if pretrain_seed is None:
            fallback = seed if config.evaluation.repeat_pretraining else config.seed
            pretrain_seed = next((p for p, f in config.seed_pairs() if f == seed), fallback)
        tokenizer_stage, data = self.tokenizer(), self.data()
        upstream = self.pretrain(pretrain_seed) if pretrained else None
        grid = config.evaluation.pretrain_seeds is not None
        name = finetune_stage(
            config.selection.method if pretrained else None, self.tag, seed, pretrain_seed if grid else None
        )

        def body(folder: Path, summary: dict) -> None:
            task = self.task()
            tokenizer = self.read_tokenizer(tokenizer_stage.path)
            if upstream is None:
                model = self.initial_model(task, tokenizer, seed)
            else:
                model = TaskModel.load(upstream.path / "model", num_labels=len(task.labels))
            set_trainable(model, config.model.freeze_embeddings, config.finetune.trainable_blocks)
            result = finetune_model(
                model,
                tokenizer,
                task,
                config.finetune,
                config.task.metric,
                config.model.max_length,
                seed,
                self.device,
                self.show_progress,
                self.frozen_states,
            )
            (folder / "scores.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
            summary.update({k: result[k] for k in ("seed", "metric", "best_epoch", "dev", "test")})

        parts = {
            "finetune": fingerprint_dump(config.finetune, exclude={"seeds"}),  # one seed per stage
            "precision": config.precision,
            "metric": config.task.metric,
            "seed": seed,
            "upstream": upstream.fingerprint if upstream else fingerprint_dump(config.model) | self._start(),
            "tokenizer": tokenizer_stage.fingerprint,
            "data": data.fingerprint,
        }
        return self.stage(name, parts, body, data_parallel=True)

    def mechanism(self, pretrained: bool = True, repeat: int = 0) -> StageResult:
        """The mechanism check: continue the warmed-up model on the subset with MLM only for
        ``evaluation.mechanism_steps`` steps, then score its task head on dev and test (no fine-tuning).

        Influence predicts which subset's MLM gradient lowers the task loss most; this measures it. With
        ``pretrained=False`` the warmed-up model is scored as it is (the reference point). Repeat ``r`` draws the
        steps' batches and masks with seed + r (``evaluation.mechanism_repeats``); repeat 0 is the single check.
        """
        config = self.config
        warmup, tokenizer_stage = self.warmup(), self.tokenizer()
        selected = self.select() if pretrained else None
        steps = config.evaluation.mechanism_steps
        name = mechanism_stage(config.selection.method if pretrained else None, self.tag, repeat)

        def body(folder: Path, summary: dict) -> None:
            task = self.task()
            tokenizer = self.read_tokenizer(tokenizer_stage.path)
            model = TaskModel.load(warmup.path / "model", num_labels=len(task.labels))
            if selected is not None:
                subset = read_subset_texts(selected.path)
                set_trainable(model, config.model.freeze_embeddings)
                settings = config.pretrain.model_copy(update={"steps": steps, "objective": "mlm", "save_every": 0})
                trained = pretrain_model(
                    model, tokenizer, subset, task, settings, config.model.max_length, config.seed + repeat,
                    self.device, show_progress=self.show_progress,
                )  # fmt: skip
                summary.update({"steps": steps, "mlm": trained.get("mlm")})
            for split in ("dev", "test"):
                scores = head_scores(
                    model, tokenizer, task, split, config.task.metric, config.model.max_length, self.device
                )
                summary.update({f"{split}_{key}": round(value, 5) for key, value in scores.items()})

        parts = {
            "steps": steps,
            "precision": config.precision,
            "pretrain": fingerprint_dump(config.pretrain),
            "warmup": warmup.fingerprint,
            "selection": selected.fingerprint if selected else None,
            "metric": config.task.metric,
            **({"repeat": repeat} if repeat else {}),  # repeat 0 keeps the single check's fingerprint
        }
        return self.stage(name, parts, body, data_parallel=True)

    def mechanism_checks(self, pretrained: bool = True) -> list[StageResult]:
        """Every repeat of the mechanism check (one for the warmed-up model alone: it has nothing to draw)."""
        repeats = self.config.evaluation.mechanism_repeats if pretrained else 1
        return [self.mechanism(pretrained, repeat) for repeat in range(repeats)]

    def mechanism_rows(self, pretrained: bool = True) -> list[dict]:
        """One table row per mechanism check: its summary (less the timing), tagged with its repeat when the check
        is repeated (the tables pair repeats by that tag; a single check's rows stay as they were)."""
        repeated = self.config.evaluation.mechanism_repeats > 1
        return [
            {**({"repeat": repeat} if repeated else {}), **{k: v for k, v in check.summary.items() if k != "seconds"}}
            for repeat, check in enumerate(self.mechanism_checks(pretrained))
        ]

    def evaluate(self) -> StageResult:
        """Fine-tune the configured method's pretrained model once per seed; mean and std of dev/test F1."""
        config = self.config
        method = config.selection.method
        runs = [self.finetune(seed, pretrain_seed=pretrain) for pretrain, seed in config.seed_pairs()]

        def body(folder: Path, summary: dict) -> None:
            scores = {split: [run.summary[split] for run in runs] for split in ("dev", "test")}
            summary.update({"method": method, "metric": config.task.metric, "seed_pairs": config.seed_pairs()})
            for split, values in scores.items():
                summary[f"{split}_mean"], summary[f"{split}_std"] = float(np.mean(values)), sample_std(values)
            (folder / "scores.json").write_text(json.dumps({**summary, **scores}, indent=2), encoding="utf-8")

        return self.stage(evaluate_stage(method, self.tag), {"runs": [run.fingerprint for run in runs]}, body)

    def run_all(self) -> StageResult:
        """Select, pretrain, fine-tune and evaluate every configured method over every seed; write the tables:
        scores, paired differences with t-intervals over pretraining seeds, subset lengths and
        (``evaluation.mechanism_steps``) the mechanism check.

        With ``evaluation.budgets`` every pretrained method runs once per budget (the paper's Table 5 sweep).
        """
        config = self.config
        plan = RunPlan(config)
        budgets = config.evaluation.budgets or [config.selection.budget]
        for method in dict.fromkeys(run.method for run in plan.runs if run.pretrained):
            self.method_variant(method).preflight(budgets)
        rows, mechanism, subsets, subset_ids = [], [], [], []
        for run in plan.runs:
            pipeline = self.method_variant(run.method, run.budget, run.tag)
            label = {"method": run.method, "budget": str(run.budget) if run.budget else "", "task": config.task.name}
            scores = pipeline.finetune(run.seed, pretrained=run.pretrained, pretrain_seed=run.pretrain_seed)
            trained = pipeline.pretrain(run.pretrain_seed) if run.pretrained else None
            rows.append(
                {
                    **label,
                    "pretrain_seed": run.pretrain_seed,
                    "seed": run.seed,
                    "test": scores.summary["test"],
                    "dev": scores.summary["dev"],
                    "subset_docs": trained.summary["subset_docs"] if trained else 0,
                    "flops": trained.summary["flops"] if trained else 0,
                    "fingerprint": scores.fingerprint,
                }
            )
        for run in [*plan.subsets(), *[r for r in plan.runs if not r.pretrained][:1]]:
            pipeline = self.method_variant(run.method, run.budget, run.tag)
            label = {"method": run.method, "budget": str(run.budget) if run.budget else "", "task": config.task.name}
            if run.pretrained:
                selected = pipeline.select()
                top = list(selected.summary["sources"].items())[:3]
                sources = ", ".join(f"{source or '?'} {share:.0%}" for source, share in top)
                counts = {k: selected.summary[k] for k in ("docs", "tokens", "mean_tokens")}
                subsets.append({**label, **counts, "sources": sources})
                subset_ids.append(read_subset_ids(selected.path))
            if config.evaluation.mechanism_steps:
                mechanism += [{**label, **row} for row in pipeline.mechanism_rows(run.pretrained)]

        subsets = with_overlaps(subsets, subset_ids)

        def body(folder: Path, summary: dict) -> None:
            table = write_results(
                [{k: v for k, v in row.items() if k != "fingerprint"} for row in rows],
                folder,
                mechanism=mechanism,
                subsets=subsets,
                margin=config.evaluation.control_margin,
                family=config.evaluation.comparisons,
            )
            summary["average"] = {line["method"]: round(line["average"], 2) for line in table}
            summary.update({"methods": len(config.evaluation.methods), "runs": len(rows)})

        parts = {"runs": [row["fingerprint"] for row in rows], "mechanism": mechanism, "subsets": subsets}
        parts["intervals"] = "t over pretraining seeds"  # tables made with bootstrap intervals are made again
        # the verdict (iss.compare) is part of the table: a table from before it, or under another margin or
        # family, is made again (from the fine-tuning runs' scores alone: seconds)
        parts["verdict"] = {"margin": config.evaluation.control_margin, "family": config.evaluation.comparisons}
        return self.stage("results", parts, body)

    def bm25_lists(self, retrieval: Path) -> RankedLists:
        """TLM's lists: each task training query's BM25 hits, best first."""
        train = self.task().splits["train"]
        names = [f"train:{i}" for i in train.column("id").to_pylist()]
        return bm25_lists(read_hits(retrieval), names, self.config.retrieval.top_k)
