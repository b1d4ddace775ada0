"""The select stage: rank the candidates by the configured method (iss.methods: influence, BM25, random, DSIR,
kNN, a random corpus sample) and take them, round-robin over the task samples' lists, up to the budget."""

from __future__ import annotations

import math
from pathlib import Path

from iss.config.schema import Budget, IssConfig, fingerprint_dump
from iss.influence.scorer import InfluenceResult
from iss.modeling.batches import token_counts
from iss.retrieval.bm25 import read_hits, read_pool
from iss.runs.folder import StageResult
from iss.selection.budget import BudgetError, RankedLists, bm25_lists, resolve_budget, round_robin, wanted_docs
from iss.selection.methods import SELECTION, Candidates
from iss.selection.selectors import text_candidates
from iss.selection.subset import source_shares, subset_table, write_subset
from iss.stages.context import StageContext
from iss.stages.influence import influence
from iss.stages.inputs import data, read_tokenizer, task, tokenizer
from iss.stages.plan import influence_stage, select_stage
from iss.stages.price import Price, Workload
from iss.stages.retrieval import pool_token_counts, retrieval


def preflight(context: StageContext, budgets: list[Budget] | None = None) -> None:
    """Every check the config, the data and the model's config can answer, made before the first expensive
    stage: the tokenizer fits the checkpoint, the influence layer exists, and each budget fits the pool (which
    retrieval makes: a few minutes at most, and the pool is needed anyway)."""
    config = context.config
    method = SELECTION[config.selection.method]
    if method.check is not None:
        method.check(config)
    context.check_tokenizer(len(read_tokenizer(context)))
    if method.needs_influence or config.evaluation.mechanism_steps:
        context.check_layer()
    lengths = pool_token_counts(context)
    for budget in budgets or [config.selection.budget]:
        kind, limit = resolve_budget(budget, lengths)
        if method.needs_influence and kind == "docs":
            check_reach(config, len(task(context).splits[config.influence.task_split]), limit)


def check_reach(config: IssConfig, task_samples: int, docs: int) -> None:
    """The most documents the influence lists can hold (task units x top-k pool units x their documents): a
    docs budget above it can never be met, so it is refused before warm-up instead of giving a smaller subset."""
    settings = config.influence
    reach = math.ceil(task_samples / settings.task_batch) * settings.top_k * settings.pool_batch
    if docs > reach:
        raise BudgetError(
            f"budget of {docs} docs is more than the influence lists can reach ({task_samples} task samples x "
            f"influence.top_k {settings.top_k} = {reach} docs at most); raise influence.top_k or lower the budget"
        )


def task_bm25_lists(context: StageContext, retrieval_folder: Path) -> RankedLists:
    """TLM's lists: each task training query's BM25 hits, best first."""
    train = task(context).splits["train"]
    names = [f"train:{i}" for i in train.column("id").to_pylist()]
    return bm25_lists(read_hits(retrieval_folder), names, context.config.retrieval.top_k)


def select(context: StageContext) -> StageResult:
    """Run whatever the configured method needs, then pick the subset under the budget."""
    config = context.config
    method = SELECTION[config.selection.method]
    if method.check is not None:
        method.check(config)
    retrieved, tokenizer_stage = retrieval(context), tokenizer(context)
    upstream = {"retrieval": retrieved.fingerprint, "tokenizer": tokenizer_stage.fingerprint}
    if method.needs_influence:
        preflight(context)  # a budget over the pool or a missing layer fails before warm-up and influence
    scored = influence(context) if method.needs_influence else None
    if scored is not None:
        upstream[influence_stage(config.influence)] = scored.fingerprint
    over_corpus = method.rank_texts is not None and config.selection.over == "corpus"
    if method.samples_corpus or over_corpus:
        upstream["corpus"] = context.corpus_signature()
    if method.rank_texts is not None:  # only a text selector's stages are fingerprinted with its settings
        upstream |= {"selectors": fingerprint_dump(config.selectors), "data": data(context).fingerprint}
    selection_dump = fingerprint_dump(config.selection, exclude=set() if over_corpus else {"over"})

    def body(folder: Path, summary: dict) -> None:
        pool = read_pool(retrieved.path)
        run_tokenizer = read_tokenizer(context, tokenizer_stage.path)
        pool_lengths = pool_token_counts(context)
        kind, limit = resolve_budget(config.selection.budget, pool_lengths)
        if method.rank_texts is not None:
            wanted = wanted_docs(kind, limit, float(pool_lengths.mean()))
            train = task(context).splits["train"]
            pool, lists = method.rank_texts(text_candidates(config, pool, train, wanted, context.device))
            summary.update({"over": config.selection.over, "candidates_kept": pool.num_rows})
        elif method.samples_corpus:
            pool = context.corpus_sample(kind, limit, float(pool_lengths.mean()))
        same_pool = method.rank_texts is None and not method.samples_corpus
        lengths = pool_lengths if same_pool else token_counts(run_tokenizer, pool.column("text").to_pylist())
        corpus_ids = pool.column("corpus_id").to_numpy()
        doc_tokens = dict(zip(corpus_ids.tolist(), lengths.tolist(), strict=True))
        if method.rank is not None:
            candidates = Candidates(
                corpus_ids,
                config.seed,
                bm25=task_bm25_lists(context, retrieved.path) if method.needs_hits else None,
                influence=InfluenceResult.load(scored.path) if scored else None,
                task_split=config.influence.task_split,
            )
            lists = method.rank(candidates)
        selection = round_robin(lists, doc_tokens, kind, limit, config.seed)
        if not selection.budget_met:
            raise BudgetError(
                f"budget {config.selection.budget} not met: the ranked lists of {method.name} ran out after "
                f"{len(selection.doc_ids)} docs; raise influence.top_k (retrieval.top_k for BM25 lists) or lower it"
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
    return context.stage(select_stage(method.name, context.tag), parts, body)


def price(work: Workload) -> Price:
    """One selection per subset: the pool tokenized, ranked, written; no training step to probe (priced by what
    selections took in this machine's earlier runs)."""
    return Price("selection", len(work.plan.subsets()))
