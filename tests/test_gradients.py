"""The influence stage's dot products against plain per-sample autograd, and the streaming top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, RobertaConfig

from iss.config.schema import InfluenceConfig
from iss.errors import ConfigError
from iss.influence.gradients import GroupGradients, autograd_gradient
from iss.influence.scorer import InfluenceObjective, InfluenceScorer, LanguageModelObjective
from iss.modeling.batches import Batch, candidate_batch, labelled_batch, per_sample_lm_loss, per_sample_task_loss
from iss.modeling.model import TaskModel, parameter_group
from iss.modeling.precision import precision

MAX_LENGTH = 64
SEED = 7
CPU = torch.device("cpu")


def _pool_and_task(chemprot_texts, corpus_texts, n_pool=10, n_task=6):
    pool_texts = corpus_texts[:n_pool]
    pool_keys = np.arange(100, 100 + n_pool)
    task_texts = [t for t, _ in chemprot_texts[:n_task]]
    task_labels = np.arange(n_task) % 5
    return pool_texts, pool_keys, task_texts, task_labels


def _grads(model, layer, tokenizer, chemprot_texts, corpus_texts, layout: str) -> GroupGradients:
    """Hook gradients with Linear weights kept dense, all as token factors, or as chosen by the cost rule."""
    _, group = parameter_group(model, layer)
    grads = GroupGradients(model, group)
    if layout == "low_rank":
        grads.low_rank = set(grads.linears)
    elif layout == "auto":
        pool_texts, pool_keys, task_texts, task_labels = _pool_and_task(chemprot_texts, corpus_texts)
        grads.choose_low_rank(
            labelled_batch(tokenizer, task_texts, task_labels, MAX_LENGTH),
            candidate_batch(model, tokenizer, pool_texts, pool_keys, 0.15, SEED, MAX_LENGTH),
        )
    return grads


def _rows(batch: Batch, members) -> Batch:
    return Batch(
        batch.input_ids[members],
        batch.attention_mask[members],
        None if batch.lm_labels is None else batch.lm_labels[members],
        None if batch.labels is None else batch.labels[members],
    )


@pytest.mark.parametrize(
    ("layer", "layout"), [("last", "dense"), ("last", "low_rank"), (1, "low_rank"), ("embeddings", "dense")]
)
def test_per_sample_gradients_equal_autograd(tiny_model, tokenizer, chemprot_texts, corpus_texts, layer, layout):
    pool_texts, pool_keys, task_texts, task_labels = _pool_and_task(chemprot_texts, corpus_texts)
    grads = _grads(tiny_model, layer, tokenizer, chemprot_texts, corpus_texts, layout)
    pool_batch = candidate_batch(tiny_model, tokenizer, pool_texts, pool_keys, 0.15, SEED, MAX_LENGTH)
    task_batch = labelled_batch(tokenizer, task_texts, task_labels, MAX_LENGTH)

    for loss_fn, batch in ((per_sample_lm_loss, pool_batch), (per_sample_task_loss, task_batch)):
        fast = grads.flatten(grads.compute(loss_fn, batch))
        for row in range(batch.input_ids.shape[0]):
            reference = autograd_gradient(tiny_model, grads.group, loss_fn, _rows(batch, [row]))
            torch.testing.assert_close(fast[row], reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def _random_batches(vocab_size: int, n: int = 6, length: int = 24) -> tuple[Batch, Batch]:
    """Random token ids with random padding: an MLM batch (random masked targets) and a labelled batch."""
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(5, vocab_size, (n, length), generator=generator)
    lengths = torch.randint(4, length + 1, (n,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0
    targets = torch.where(
        (torch.rand(n, length, generator=generator) < 0.3) & mask.bool(), ids, torch.full_like(ids, -100)
    )
    targets[torch.arange(n), 0] = ids[:, 0]  # at least one target per row
    labels = torch.randint(0, 5, (n,), generator=generator)
    return Batch(ids, mask, targets), Batch(ids, mask, labels=labels)


@pytest.mark.parametrize(
    ("layer", "layout"), [("last", "low_rank"), ("last", "dense"), (1, "low_rank"), ("embeddings", "dense")]
)
def test_gradients_on_random_inputs_equal_autograd(tiny_model, tokenizer, layer, layout):
    _, group = parameter_group(tiny_model, layer)
    grads = GroupGradients(tiny_model, group)
    grads.low_rank = set(grads.linears) if layout == "low_rank" else set()
    mlm_batch, task_batch = _random_batches(len(tokenizer))
    for loss_fn, batch in ((per_sample_lm_loss, mlm_batch), (per_sample_task_loss, task_batch)):
        fast = grads.flatten(grads.compute(loss_fn, batch))
        for row in range(len(batch.input_ids)):
            reference = autograd_gradient(tiny_model, group, loss_fn, _rows(batch, [row]))
            torch.testing.assert_close(fast[row], reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
        # mini-batch matching: the mean of member rows is the gradient of the batch-mean loss
        groups = [np.array([0, 2, 5]), np.array([1, 3, 4])]
        matched = grads.flatten(grads.compute(loss_fn, batch).group_mean(groups))
        for index, members in enumerate(groups):
            reference = autograd_gradient(tiny_model, group, loss_fn, _rows(batch, members))
            torch.testing.assert_close(matched[index], reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_cost_rule_factors_the_last_blocks_position_wise_layers(tiny_model, tokenizer, chemprot_texts, corpus_texts):
    """[CLS]-only task gradients make query/output/feed-forward weights rank-1 per task sample; keys and values
    are rank-1 per head on the task side but see every token of a candidate, so here they stay dense."""
    grads = _grads(tiny_model, "last", tokenizer, chemprot_texts, corpus_texts, "auto")
    names = {
        name.split(".")[-1] if "attention" in name else name
        for name, m in grads.group.named_modules()
        if m in grads.low_rank
    }
    assert {"query", "intermediate.dense", "output.dense"} <= names
    assert not names & {"key", "value"}


def _roberta_model(tokenizer) -> TaskModel:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=MAX_LENGTH + tokenizer.pad_token_id + 1,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return TaskModel(AutoModelForMaskedLM.from_config(config, attn_implementation="eager"), 5).eval()


@pytest.mark.parametrize("architecture", ["bert", "roberta"])
def test_attention_key_value_gradients_are_one_row_per_head_and_exact(
    tiny_model, tokenizer, chemprot_texts, corpus_texts, architecture
):
    """The task loss reads [CLS] only, so in the last block each head's key/value gradient is rank one: a task
    sample keeps one factor row per head (not one per token) and the gradient still equals autograd. A candidate
    with several masked tokens is not rank one per head and keeps its token rows, exactly."""
    model = tiny_model if architecture == "bert" else _roberta_model(tokenizer)
    pool_texts, pool_keys, task_texts, task_labels = _pool_and_task(chemprot_texts, corpus_texts)
    _, group = parameter_group(model, "last")
    grads = GroupGradients(model, group)
    grads.low_rank = set(grads.linears)
    attention = group.attention.self
    assert grads.heads == {attention.key: attention.num_attention_heads, attention.value: attention.num_attention_heads}
    task_batch = labelled_batch(tokenizer, task_texts, task_labels, MAX_LENGTH)
    pool_batch = candidate_batch(model, tokenizer, pool_texts, pool_keys, 0.5, SEED, MAX_LENGTH)
    position = {m: i for i, m in enumerate(m for m in grads.modules if m in grads.low_rank)}
    for loss_fn, batch in ((per_sample_task_loss, task_batch), (per_sample_lm_loss, pool_batch)):
        features = grads.compute(loss_fn, batch)
        rows = features.low_rank[position[attention.key]].owner.bincount(minlength=len(batch.input_ids))
        tokens = batch.attention_mask.sum(1)
        if loss_fn is per_sample_task_loss:
            assert rows.tolist() == [attention.num_attention_heads] * len(task_texts)
        else:
            assert (rows > attention.num_attention_heads).any() and (rows <= tokens).all()
        fast = grads.flatten(features)
        for row in range(len(batch.input_ids)):
            reference = autograd_gradient(model, group, loss_fn, _rows(batch, [row]))
            torch.testing.assert_close(fast[row], reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def _scorer(model, tokenizer, **settings) -> InfluenceScorer:
    return InfluenceScorer(model, tokenizer, InfluenceConfig(**settings), seed=SEED, max_length=MAX_LENGTH)


@pytest.mark.parametrize(
    ("layer", "pool_batch", "task_batch", "layout"),
    [
        ("last", 1, 1, "auto"),
        ("last", 1, 1, "low_rank"),
        ("last", 3, 2, "auto"),
        ("last", 2, 3, "dense"),
        ("embeddings", 2, 3, "auto"),
        (1, 1, 4, "low_rank"),
    ],
)
def test_scorer_scores_equal_autograd_dot_products(
    tiny_model, tokenizer, chemprot_texts, corpus_texts, layer, pool_batch, task_batch, layout
):
    """The scorer's kept scores are the dot products of autograd gradients of batch-mean losses."""
    pool_texts, pool_keys, task_texts, task_labels = _pool_and_task(chemprot_texts, corpus_texts)
    settings = {"layer": layer, "pool_batch": pool_batch, "task_batch": task_batch, "compute_batch": 4}
    scorer = _scorer(tiny_model, tokenizer, top_k=len(pool_texts), **settings)
    scorer.fit(task_texts, task_labels, candidate_probe=pool_texts, layout=layout)
    result = scorer.score(pool_texts, pool_keys)
    task_groups, unit_groups = scorer.task_units, scorer.candidate_units(len(pool_texts))
    assert [sorted(keys) for keys in result.pool_units] == [sorted(pool_keys[u].tolist()) for u in unit_groups]

    task_all = labelled_batch(tokenizer, task_texts, task_labels, MAX_LENGTH)
    pool_all = candidate_batch(tiny_model, tokenizer, pool_texts, pool_keys, 0.15, SEED, MAX_LENGTH)
    group = scorer.grads.group
    task_refs = [autograd_gradient(tiny_model, group, per_sample_task_loss, _rows(task_all, g)) for g in task_groups]
    unit_refs = [autograd_gradient(tiny_model, group, per_sample_lm_loss, _rows(pool_all, g)) for g in unit_groups]
    expected = (torch.stack(unit_refs) @ torch.stack(task_refs).T).numpy()  # [pool units, task units]

    for task_unit in range(len(task_groups)):
        kept, got = result.top.ids[task_unit], result.top.scores[task_unit]
        np.testing.assert_allclose(got, expected[kept, task_unit], rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        assert sorted(kept.tolist()) == list(range(len(unit_groups)))  # k = all units: every unit kept once
        assert np.all(got[:-1] >= got[1:])  # best first
    np.testing.assert_allclose(result.unit_means, expected.mean(1), rtol=1e-4, atol=1e-4 * np.abs(expected).max())


class _ScaledLosses(LanguageModelObjective):
    """A user's objective: both losses rescaled (a stand-in for losses of one's own)."""

    def candidate_loss(self, model, batch):
        return super().candidate_loss(model, batch) * 0.5

    def task_loss(self, model, batch):
        return super().task_loss(model, batch) * 2.5


def test_an_objective_of_ones_own_changes_exactly_the_losses_influence_differentiates(
    tiny_model, tokenizer, chemprot_texts, corpus_texts
):
    """``InfluenceScorer(objective=...)`` (iss.InfluenceObjective, as kronfluence's Task): each task sample's
    influence is the product of both gradients, so halving the candidate loss and scaling the task loss by 2.5
    scales every score by exactly 1.25 (and a scorer that ignored either hook would not)."""
    pool_texts, pool_keys, task_texts, task_labels = _pool_and_task(chemprot_texts, corpus_texts)
    scores = []
    for objective in (None, _ScaledLosses()):
        scorer = InfluenceScorer(
            tiny_model, tokenizer, InfluenceConfig(top_k=len(pool_texts), compute_batch=4),
            seed=SEED, max_length=MAX_LENGTH, objective=objective,
        )  # fmt: skip
        scorer.fit(task_texts, task_labels)
        result = scorer.score(pool_texts, pool_keys)
        dense = np.zeros((len(task_texts), len(pool_texts)))
        np.put_along_axis(dense, result.top.ids, result.top.scores, axis=1)
        scores.append(dense)
    np.testing.assert_allclose(scores[1], scores[0] * 1.25, rtol=1e-4, atol=1e-4 * np.abs(scores[1]).max())
    assert isinstance(InfluenceScorer(tiny_model, tokenizer).objective, InfluenceObjective)  # the protocol holds


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_is_the_kronecker_projection_of_the_exact_gradient(
    tiny_model, tokenizer, chemprot_texts, corpus_texts, kind
):
    pool_texts, pool_keys, _, _ = _pool_and_task(chemprot_texts, corpus_texts)
    batch = candidate_batch(tiny_model, tokenizer, pool_texts, pool_keys, 0.15, SEED, MAX_LENGTH)
    exact_grads = _grads(tiny_model, "last", tokenizer, chemprot_texts, corpus_texts, "dense")
    exact = exact_grads.flatten(exact_grads.compute(per_sample_lm_loss, batch))

    projected_grads = _grads(tiny_model, "last", tokenizer, chemprot_texts, corpus_texts, "dense")
    projected_grads.project(512, kind, seed=3)
    projected = projected_grads.compute(per_sample_lm_loss, batch).dense
    assert projected.shape[1] < exact.shape[1] / 4

    # Rebuild the projected features from the exact gradients: P_out^T G P_in per Linear, the rest unchanged.
    offset, expected = 0, []
    for module in projected_grads.modules:
        for name, parameter in module.named_parameters(recurse=False):
            block = exact[:, offset : offset + parameter.numel()]
            offset += parameter.numel()
            if name == "weight" and module in projected_grads.projections:
                projection = projected_grads.projections[module]
                weight = block.reshape(-1, *parameter.shape)
                block = (projection.out_matrix.T @ weight @ projection.in_matrix).reshape(len(batch.input_ids), -1)
            expected.append(block)
    torch.testing.assert_close(projected, torch.cat(expected, dim=1), rtol=1e-4, atol=1e-5)

    again = _grads(tiny_model, "last", tokenizer, chemprot_texts, corpus_texts, "dense")
    again.project(512, kind, seed=3)
    assert torch.equal(again.compute(per_sample_lm_loss, batch).dense, projected)


class _Killed(Exception):
    pass


def test_scorer_resumes_from_last_finished_shard(tiny_model, tokenizer, chemprot_texts, corpus_texts, tmp_path):
    pool_texts, pool_keys, task_texts, task_labels = _pool_and_task(chemprot_texts, corpus_texts, 14)
    scorer = _scorer(tiny_model, tokenizer, top_k=5, compute_batch=2, shard_units=4).fit(task_texts, task_labels)
    whole = scorer.score(pool_texts, pool_keys)

    state, seen = tmp_path / "topk.npz", []

    def die_after_ten(n: int) -> None:
        seen.append(n)
        if sum(seen) >= 10:
            raise _Killed

    with pytest.raises(_Killed):
        scorer.score(pool_texts, pool_keys, state, die_after_ten)
    # shards of 4: the two starting at units 0 and 4 finished before the kill
    assert np.load(state)["done"].tolist() == [0, 4]
    resumed_progress = []
    resumed = scorer.score(pool_texts, pool_keys, state, resumed_progress.append)
    assert resumed_progress[0] == 8 and sum(resumed_progress) == len(pool_texts)
    np.testing.assert_allclose(resumed.top.scores, whole.top.scores)
    np.testing.assert_array_equal(resumed.top.ids, whole.top.ids)
    np.testing.assert_allclose(resumed.unit_means, whole.unit_means)


def test_tied_embeddings_are_refused(tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    from iss.modeling.model import TaskModel

    tied = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=1,
            intermediate_size=16,
            tie_word_embeddings=True,
        )
    )
    with pytest.raises(ConfigError, match="untied"):
        parameter_group(TaskModel(tied, 3), "embeddings")
    with pytest.raises(ConfigError, match="out of range"):
        parameter_group(TaskModel(tied, 3), 5)


@pytest.mark.parametrize(("layer", "layout"), [("last", "auto"), ("last", "low_rank"), ("embeddings", "dense")])
def test_cosine_scores_equal_autograd_cosines(tiny_model, tokenizer, chemprot_texts, corpus_texts, layer, layout):
    """similarity=cosine: each sample's gradient normalised (norms from the factors, not a dense copy); a matched
    pair of batches scores the mean cosine over its member pairs. The per-unit means rank the whole pool."""
    pool_texts, pool_keys, task_texts, task_labels = _pool_and_task(chemprot_texts, corpus_texts)
    settings = {"layer": layer, "pool_batch": 3, "task_batch": 2, "compute_batch": 4, "similarity": "cosine"}
    scorer = _scorer(tiny_model, tokenizer, top_k=len(pool_texts), **settings)
    scorer.fit(task_texts, task_labels, candidate_probe=pool_texts, layout=layout)
    result = scorer.score(pool_texts, pool_keys)
    task_groups, unit_groups = scorer.task_units, scorer.candidate_units(len(pool_texts))

    def unit(rows):
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)

    group = scorer.grads.group
    task_all = labelled_batch(tokenizer, task_texts, task_labels, MAX_LENGTH)
    pool_all = candidate_batch(tiny_model, tokenizer, pool_texts, pool_keys, 0.15, SEED, MAX_LENGTH)
    task_refs = unit([autograd_gradient(tiny_model, group, per_sample_task_loss, _rows(task_all, [i]))
                      for i in range(len(task_texts))])  # fmt: skip
    pool_refs = unit([autograd_gradient(tiny_model, group, per_sample_lm_loss, _rows(pool_all, [i]))
                      for i in range(len(pool_texts))])  # fmt: skip
    cosines = pool_refs @ task_refs.T
    expected = torch.stack(
        [torch.stack([cosines[u][:, t].mean() for t in task_groups]) for u in unit_groups]
    ).numpy()  # [pool units, task units]
    assert np.abs(expected).max() <= 1 + 1e-5
    for task_unit in range(len(task_groups)):
        kept = result.top.ids[task_unit]
        np.testing.assert_allclose(result.top.scores[task_unit], expected[kept, task_unit], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.unit_means, expected.mean(1), rtol=1e-4, atol=1e-5)


def test_gradient_norms_from_factors_equal_explicit_norms(tiny_model, tokenizer, chemprot_texts, corpus_texts):
    pool_texts, pool_keys, _, _ = _pool_and_task(chemprot_texts, corpus_texts)
    batch = candidate_batch(tiny_model, tokenizer, pool_texts, pool_keys, 0.15, SEED, MAX_LENGTH)
    for layout in ("low_rank", "dense"):
        grads = _grads(tiny_model, "last", tokenizer, chemprot_texts, corpus_texts, layout)
        features = grads.compute(per_sample_lm_loss, batch)
        torch.testing.assert_close(features.norms(), grads.flatten(features).norm(dim=1), rtol=1e-4, atol=1e-6)
        normalised = grads.flatten(features.normalised())
        torch.testing.assert_close(normalised.norm(dim=1), torch.ones(len(pool_texts)), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_scores_track_fp32_and_accumulate_in_float32(tiny_model, tokenizer, chemprot_texts, corpus_texts):
    """precision('bf16') runs the forward passes under bfloat16 autocast (the GPU code path, here on CPU); the
    per-sample gradients and their dot products are float32 and close to the fp32 ones."""
    pool_texts, pool_keys, task_texts, task_labels = _pool_and_task(chemprot_texts, corpus_texts)
    scores = {}
    for name in ("fp32", "bf16"):
        with precision(name):
            scorer = _scorer(tiny_model, tokenizer, top_k=len(pool_texts), compute_batch=4)
            scorer.fit(task_texts, task_labels, candidate_probe=pool_texts)
            assert scorer.bank.dense.dtype == torch.float32
            seen: list[torch.dtype] = []
            handle = tiny_model.lm_head.register_forward_hook(
                lambda module, args, out, seen=seen: seen.append(out.dtype)
            )
            result = scorer.score(pool_texts, pool_keys)
            handle.remove()
        assert set(seen) == {torch.bfloat16 if name == "bf16" else torch.float32}
        scores[name] = result.unit_means
    assert scores["bf16"].dtype == np.float64 and np.isfinite(scores["bf16"]).all()
    np.testing.assert_allclose(scores["bf16"], scores["fp32"], rtol=0.1, atol=0.05 * np.abs(scores["fp32"]).max())
    assert not np.array_equal(scores["bf16"], scores["fp32"])  # autocast really ran
    with pytest.raises(ValueError, match="precision"), precision("fp8"):
        pass
