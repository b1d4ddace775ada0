"""Pretraining (TLM's joint objective) resumes exactly; fine-tuning scores are scikit-learn's F1."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch
from sklearn.metrics import f1_score

from iss.config.schema import FinetuneConfig, ModelConfig, PretrainConfig, fingerprint_dump
from iss.data.task import TaskData, sample_rows
from iss.modeling import model as iss_model
from iss.modeling.batches import PackedDocuments, encode
from iss.modeling.family import FAMILIES
from iss.modeling.frozen import FrozenBlockFeatures, FrozenStates
from iss.modeling.model import TaskModel, set_trainable
from iss.training import finetuning, loop, pretraining
from iss.training.finetuning import f1
from iss.training.loop import TrainingBatches
from iss.training.pretraining import pretrain, task_batch_schedule

from .conftest import SHARED, require_shared


def test_f1_matches_scikit_learn_on_known_predictions():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    predictions = np.array([0, 1, 1, 1, 2, 0, 2, 2])
    # micro-F1 over single-label predictions is accuracy: 5 of 8 right
    assert f1(labels, predictions, "micro_f1") == pytest.approx(5 / 8)
    # macro, by hand: class 0 P=R=1/2 -> 1/2; class 1 P=2/3 R=1 -> 4/5; class 2 P=R=2/3 -> 2/3; class 3 -> 0
    assert f1(labels, predictions, "macro_f1") == pytest.approx((1 / 2 + 4 / 5 + 2 / 3 + 0) / 4)
    assert f1(labels, predictions, "macro_f1") == pytest.approx(f1_score(labels, predictions, average="macro"))


def _task(chemprot_texts) -> TaskData:
    rows = chemprot_texts[:40]
    labels = sorted({label for _, label in rows})
    table = pa.table(
        {
            "id": list(range(len(rows))),
            "text": [t for t, _ in rows],
            "label": [label for _, label in rows],
            "label_id": [labels.index(label) for _, label in rows],
        }
    )
    return TaskData("chemprot", {"train": table, "dev": table}, labels)


def _fresh(tokenizer, n_labels: int) -> TaskModel:
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=48)
    return TaskModel.from_scratch(config, tokenizer, n_labels)


class _Killed(Exception):
    pass


def _die_at_encoder_call(model: TaskModel, call: int) -> None:
    """Make the ``call``-th forward pass of the encoder raise, as a kill mid-run would stop it."""
    original, calls = model.base.forward, {"n": 0}

    def dying_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise _Killed
        return original(*args, **kwargs)

    model.base.forward = dying_forward


def test_pretraining_resumed_after_a_kill_ends_with_the_same_weights(tokenizer, chemprot_texts, corpus_texts, tmp_path):
    task = _task(chemprot_texts)
    subset = corpus_texts[:60]
    config = PretrainConfig(steps=8, batch_size=4, accumulation=2, rho1=3, rho2=5.0, save_every=3)
    cpu = torch.device("cpu")

    whole = _fresh(tokenizer, len(task.labels))
    summary = pretrain(whole, tokenizer, subset, task, config, 48, 3, cpu, show_progress=False)
    assert summary["task_micro_batches"] == 5  # micro-batches 2, 5, 8, 11, 14 of 16: (s + 1) % rho1 == 0
    assert summary["subset_micro_batches"] == 11

    checkpoint = tmp_path / "checkpoint"
    interrupted = _fresh(tokenizer, len(task.labels))
    # 1-2 encoder calls per micro-batch, 2 micro-batches per step: call 14 comes after the step-3
    # checkpoint (at most 12 calls by then) and before the run ends (at least 16 calls).
    _die_at_encoder_call(interrupted, 14)
    with pytest.raises(_Killed):
        pretrain(interrupted, tokenizer, subset, task, config, 48, 3, cpu, checkpoint, show_progress=False)
    assert checkpoint.joinpath("state.pt").is_file()

    resumed = _fresh(tokenizer, len(task.labels))
    pretrain(resumed, tokenizer, subset, task, config, 48, 3, cpu, checkpoint, show_progress=False)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    changed = _fresh(tokenizer, len(task.labels))
    assert not torch.equal(changed.classifier.weight, resumed.classifier.weight)  # training did move the weights


def test_task_batches_follow_tlm_rho1():
    schedule = task_batch_schedule(2000, 999)
    assert np.flatnonzero(schedule).tolist() == [998, 1997]  # one task batch per 999 micro-batches
    assert task_batch_schedule(5, 1).all() and task_batch_schedule(5, 0).all()  # rho1 <= 1: every batch
    assert not task_batch_schedule(5, 1, objective="mlm").any()  # further pretraining: subset MLM only


def test_task_batch_loss_weights_mlm_by_rho2(tokenizer, chemprot_texts, corpus_texts, monkeypatch):
    """TLM's task-batch loss is (rho2 * MLM + task) / (rho2 + 1); subset batches get the MLM loss alone."""
    captured = {}

    def capture(model, settings, step_loss, seed, *args, **kwargs):
        captured["step_loss"] = step_loss
        return {}

    monkeypatch.setattr(pretraining, "train_loop", capture)
    task = _task(chemprot_texts)
    config = PretrainConfig(steps=4, batch_size=4, rho1=2, rho2=20.0)
    model = _fresh(tokenizer, len(task.labels))
    pretrain(model, tokenizer, corpus_texts[:40], task, config, 48, 0, torch.device("cpu"), show_progress=False)
    subset_loss, subset_parts = captured["step_loss"](0, 0)  # micro-batch 0: (0 + 1) % 2 != 0, a subset batch
    assert set(subset_parts) == {"mlm"} and subset_loss.item() == pytest.approx(subset_parts["mlm"])
    task_loss, parts = captured["step_loss"](1, 0)  # micro-batch 1: (1 + 1) % 2 == 0, a task batch
    assert set(parts) == {"task_mlm", "task"}
    expected = (20.0 * parts["task_mlm"] + parts["task"]) / 21.0
    assert task_loss.item() == pytest.approx(expected, rel=1e-5)
    assert task_loss.item() != pytest.approx(parts["task_mlm"] + 20.0 * parts["task"], rel=1e-3)


def test_unigram_level_is_the_entropy_of_token_frequencies(tokenizer):
    assert pretraining.unigram_entropy(tokenizer, ["a b c d"] * 3) == pytest.approx(np.log(4))
    skewed = pretraining.unigram_entropy(tokenizer, ["a a a b"])
    assert skewed == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))


def test_length_buckets_cover_every_row_once_and_pad_less():
    lengths = np.random.default_rng(0).integers(5, 200, size=1000)
    batches = loop.bucketed_batches(lengths, 16, seed=3, epoch=0, pool=10)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(1000)) and len(batches) == 63  # ceil(1000 / 16)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    shuffled = np.random.default_rng(1).permutation(1000)
    random_padded = sum(16 * lengths[shuffled[i : i + 16]].max() for i in range(0, 1000, 16))
    assert padded < 0.7 * random_padded
    again = loop.bucketed_batches(lengths, 16, seed=3, epoch=0, pool=10)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    other_epoch = loop.bucketed_batches(lengths, 16, seed=3, epoch=1, pool=10)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other_epoch, strict=True))


def test_packed_rows_hold_every_document_in_order_with_no_padding_but_the_last(tokenizer, corpus_texts):
    texts = corpus_texts[:50]
    packed = PackedDocuments.pack(tokenizer, texts, max_length=32, family=FAMILIES["encoder"])
    assert (packed.input_ids[:, 0] == tokenizer.cls_token_id).all()
    assert (packed.lengths[:-1] == 32).all() and 1 < packed.lengths[-1] <= 32
    stream = np.concatenate([row[1:length] for row, length in zip(packed.input_ids, packed.lengths, strict=True)])
    expected = [t for text in texts for t in [*tokenizer(text, add_special_tokens=False)["input_ids"], 3]]
    assert tokenizer.sep_token_id == 3 and stream.tolist() == expected  # nothing truncated, nothing reordered
    batch = packed.batch(np.array([len(packed) - 1, 0]))
    assert batch.input_ids.shape == (2, 32) and batch.attention_mask.sum(1).tolist() == [packed.lengths[-1], 32]


def test_packed_pretraining_trains_on_more_real_tokens_and_resumes_exactly(
    tokenizer, chemprot_texts, corpus_texts, tmp_path
):
    task = _task(chemprot_texts)
    subset = corpus_texts[:80]
    cpu = torch.device("cpu")
    unpacked = PretrainConfig(steps=6, batch_size=4, rho1=3, save_every=2)
    packed = unpacked.model_copy(update={"packing": True})
    mlm_only = {"objective": "mlm", "save_every": 0}
    plain, full = (
        pretrain(_fresh(tokenizer, 1), tokenizer, subset, task, c.model_copy(update=mlm_only), 48, 1, cpu, None, False)
        for c in (unpacked, packed)
    )
    assert full["tokens"] == plain["tokens"] == 6 * 4 * 48  # the same steps and shapes, as the paper counts them
    assert plain["real_tokens"] < 0.8 * full["real_tokens"]  # a row per document: short ones leave padding
    assert full["real_tokens"] >= 23 * 48 and full["packed_rows"] > 24  # packs are full (the last one may not be)
    whole = _fresh(tokenizer, len(task.labels))
    summary = pretrain(whole, tokenizer, subset, task, packed, 48, 1, cpu, None, False)

    checkpoint = tmp_path / "checkpoint"
    stopped = _fresh(tokenizer, len(task.labels))
    _die_at_encoder_call(stopped, 7)  # 1-2 calls per step: after the step-2 checkpoint, before step 6 ends
    with pytest.raises(_Killed):
        pretrain(stopped, tokenizer, subset, task, packed, 48, 1, cpu, checkpoint, False)
    assert checkpoint.joinpath("state.pt").is_file()
    resumed = _fresh(tokenizer, len(task.labels))
    again = pretrain(resumed, tokenizer, subset, task, packed, 48, 1, cpu, checkpoint, False)
    assert again["real_tokens"] == summary["real_tokens"]  # counted over the whole run, not this process's part
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_an_option_at_its_cache_neutral_default_leaves_fingerprints_alone():
    default, packed = PretrainConfig(), PretrainConfig(packing=True, trainable_blocks=2)
    neutral = {"packing", "trainable_blocks"}
    assert not neutral & set(fingerprint_dump(default))
    assert fingerprint_dump(packed)["packing"] is True and fingerprint_dump(packed)["trainable_blocks"] == 2
    assert fingerprint_dump(default) == {k: v for k, v in default.model_dump(mode="json").items() if k not in neutral}


def test_training_batches_cover_every_row_once_per_epoch_in_either_order(tokenizer, corpus_texts):
    texts = corpus_texts[:70]
    for buckets in (False, True):
        batches = TrainingBatches(tokenizer, texts, 8, seed=2, length_buckets=buckets)
        assert batches.steps_per_epoch == 9
        for epoch in (0, 1):
            rows = np.concatenate([batches(epoch * 9 + step) for step in range(9)])
            assert sorted(rows.tolist()) == list(range(70))
    lengths = np.asarray(tokenizer(texts, add_special_tokens=False, return_length=True)["length"])
    assert np.array_equal(batches(12), loop.bucketed_batches(lengths, 8, 2, epoch=1)[3])


def test_fine_tuning_keeps_and_tests_the_weights_of_the_best_dev_epoch(tokenizer, chemprot_texts, monkeypatch):
    """Dev peaks at epoch 2 of 3: the model ends with epoch 2's weights, and test is scored on them, once."""
    task = _task(chemprot_texts)
    task.splits["test"] = task.splits["dev"]
    model = _fresh(tokenizer, len(task.labels))
    dev_scores, snapshots, test_calls = iter([0.5, 0.9, 0.7]), [], []

    def scripted(model, tokenizer, task, split, *args):
        weights = {name: p.detach().clone() for name, p in model.named_parameters()}
        if split == "dev":
            snapshots.append(weights)
            return {"f1": next(dev_scores), "task_loss": 0.0}
        test_calls.append(weights)
        return {"f1": 0.42, "task_loss": 0.0}

    monkeypatch.setattr(finetuning, "head_scores", scripted)
    config = FinetuneConfig(epochs=3, batch_size=8, learning_rate=1e-3, seeds=[0])
    result = finetuning.finetune(model, tokenizer, task, config, "micro_f1", 48, 0, torch.device("cpu"), False)
    assert (result["best_epoch"], result["dev"], result["test"]) == (2, 0.9, 0.42)
    assert [e["epoch"] for e in result["epochs"]] == [1, 2, 3] and len(test_calls) == 1
    final = dict(model.named_parameters())
    for name, value in snapshots[1].items():
        torch.testing.assert_close(final[name].detach(), value, msg=name)
        torch.testing.assert_close(test_calls[0][name], value, msg=name)
    assert any(not torch.equal(snapshots[2][n], snapshots[1][n]) for n in final)  # epoch 3 did move the weights


def test_top_blocks_on_cached_frozen_states_give_the_full_models_logits_and_gradients(tokenizer, chemprot_texts):
    """Texts of different lengths (so padding and the attention mask matter), dropout off: the cached path's
    logits and the top block's gradients equal those of the whole model with the lower blocks frozen."""
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, max_length=48)
    model = TaskModel.from_scratch(config, tokenizer, 4).eval()
    set_trainable(model, trainable_blocks=1)
    texts = [" ".join(text.split()[: 3 + 5 * i]) for i, (text, _) in enumerate(chemprot_texts[:6])]
    targets = torch.tensor([0, 1, 2, 3, 0, 1])
    assert len(set(encode(tokenizer, texts, 48).attention_mask.sum(1).tolist())) > 3
    cache = FrozenBlockFeatures(model, trainable_blocks=1)
    states = cache.encode(tokenizer, texts, 48, torch.device("cpu"), batch_size=4)
    expected = finetuning.task_logits(model, tokenizer, texts, 48, torch.device("cpu"))
    torch.testing.assert_close(cache.predict(states, torch.device("cpu"), batch_size=4), expected)

    top = [*cache.top.parameters(), *model.classifier.parameters()]  # the MLM head and pooler are not on the path
    batch = encode(tokenizer, texts, 48)
    full = torch.nn.functional.cross_entropy(model.task_logits(batch.input_ids, batch.attention_mask), targets)
    full_grads = torch.autograd.grad(full, top)
    cached = torch.nn.functional.cross_entropy(cache.logits(states, torch.device("cpu")), targets)
    for mine, theirs in zip(torch.autograd.grad(cached, top), full_grads, strict=True):
        torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("trainable", [1, 0])
def test_fine_tuning_on_cached_frozen_blocks_equals_the_plain_run_without_dropout(
    tokenizer, chemprot_texts, trainable: int
) -> None:
    """With dropout 0 caching changes nothing but the cost: the same dev curve, test F1 and final weights. With no
    trainable block (a linear probe, the gate's reading of what pretraining left in the blocks) only the classifier
    changes."""
    task = _task(chemprot_texts)
    task.splits["test"] = task.splits["dev"]
    config = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=48, dropout=0.0)
    results, weights = [], []
    for cache in (False, True):
        torch.manual_seed(0)
        model = TaskModel.from_scratch(config, tokenizer, len(task.labels))
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        set_trainable(model, trainable_blocks=trainable)
        settings = FinetuneConfig(epochs=2, batch_size=8, learning_rate=1e-3, trainable_blocks=trainable, seeds=[0])
        settings = settings.model_copy(update={"cache_frozen_blocks": cache})
        results.append(finetuning.finetune(model, tokenizer, task, settings, "micro_f1", 48, 0, torch.device("cpu")))
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    plain, cached = results
    assert [e["dev"] for e in cached["epochs"]] == pytest.approx([e["dev"] for e in plain["epochs"]])
    assert cached["test"] == pytest.approx(plain["test"]) and cached["task_loss"] == pytest.approx(plain["task_loss"])
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, msg=name)
    changed = {name for name, value in initial.items() if not torch.equal(weights[1][name], value)}
    assert changed  # it did train
    if trainable == 0:
        assert all(name.startswith("classifier.") for name in changed)


def test_a_low_resource_fine_tune_trains_on_its_seeded_sample_cached_or_not(tokenizer, chemprot_texts) -> None:
    """``finetune.max_train``: the run on cached states of the whole train split, with a 20-example sample drawn by
    the fine-tuning seed, equals a plain run on a task whose train split is that sample."""
    task = _task(chemprot_texts)
    task.splits["test"] = task.splits["dev"]
    keep = sample_rows(task.splits["train"].num_rows, 20, 3)
    sampled = TaskData(task.name, {**task.splits, "train": task.splits["train"].take(keep)}, task.labels)
    config = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=48, dropout=0.0)
    results, weights = [], []
    for data, limit, cache in ((task, 20, True), (sampled, None, False)):
        torch.manual_seed(0)
        model = TaskModel.from_scratch(config, tokenizer, len(task.labels))
        set_trainable(model, trainable_blocks=1)
        settings = FinetuneConfig(epochs=3, batch_size=4, learning_rate=1e-3, trainable_blocks=1, seeds=[3])
        settings = settings.model_copy(update={"cache_frozen_blocks": cache, "max_train": limit})
        results.append(finetuning.finetune(model, tokenizer, data, settings, "micro_f1", 48, 3, torch.device("cpu")))
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert task.splits["train"].num_rows > 20 and len(keep) == 20
    assert [e["dev"] for e in results[0]["epochs"]] == pytest.approx([e["dev"] for e in results[1]["epochs"]])
    for name, value in weights[1].items():
        torch.testing.assert_close(weights[0][name], value, msg=name)


def test_seeds_of_one_pretrained_model_share_its_frozen_states(tokenizer, chemprot_texts, monkeypatch):
    """A second seed given the first seed's states encodes nothing and fine-tunes exactly as if it had encoded."""
    task = _task(chemprot_texts)
    task.splits["test"] = task.splits["dev"]
    config = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=48)
    torch.manual_seed(0)
    pretrained = TaskModel.from_scratch(config, tokenizer, len(task.labels)).state_dict()
    settings = FinetuneConfig(epochs=2, batch_size=8, learning_rate=1e-3, trainable_blocks=1, cache_frozen_blocks=True)
    encoded = []
    original = FrozenBlockFeatures.encode
    monkeypatch.setattr(FrozenBlockFeatures, "encode", lambda *a: encoded.append(1) or original(*a))

    def run(seed: int, states: FrozenStates | None) -> dict:
        model = TaskModel.from_scratch(config, tokenizer, len(task.labels))
        model.load_state_dict(pretrained)
        set_trainable(model, trainable_blocks=1)
        return finetuning.finetune(
            model, tokenizer, task, settings, "micro_f1", 48, seed, torch.device("cpu"), False, states
        )

    shared = FrozenStates()
    run(0, shared)
    assert len(encoded) == 3 and [set(entry) for entry in shared.full.values()] == [{"train", "dev", "test"}]
    reused = run(1, shared)
    assert len(encoded) == 3
    alone = run(1, None)
    assert len(encoded) == 6
    assert reused["epochs"] == alone["epochs"] and reused["test"] == alone["test"]
    assert reused["task_loss"] == alone["task_loss"]


def test_models_that_differ_only_above_the_untouched_blocks_share_their_states(tokenizer, chemprot_texts, monkeypatch):
    """Pretraining that trains the top 2 of 3 blocks leaves block 0 the checkpoint's: its states are encoded once
    for every such model, each running only its own frozen block 1 on them, and equal a plain encoding; a model
    whose block 0 differs encodes from the embeddings."""
    task = _task(chemprot_texts)
    config = ModelConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, max_length=48)
    torch.manual_seed(0)
    base = TaskModel.from_scratch(config, tokenizer, len(task.labels)).eval()
    calls = []
    original = FrozenBlockFeatures.encode
    monkeypatch.setattr(
        FrozenBlockFeatures, "encode", lambda *a: calls.append(a[-1] if len(a) > 6 else None) or original(*a)
    )
    cache, cpu = FrozenStates(untouched_top=2), torch.device("cpu")

    def variant(block: int) -> TaskModel:
        model = copy.deepcopy(base)
        with torch.no_grad():
            next(model.layout.blocks[block].parameters()).add_(0.1)
        return model

    for model in (base, variant(1), variant(2)):
        frozen = FrozenBlockFeatures(model, trainable_blocks=1)
        states = cache.states(frozen, tokenizer, task, "dev", 48, cpu, 8)
        plain = original(frozen, tokenizer, task.texts("dev"), 48, cpu, 8)
        for mine, theirs in zip(states, plain, strict=True):
            torch.testing.assert_close(mine, theirs)
    assert calls == [1]  # block 0's states once; base, block 1 changed and block 2 changed (not frozen) share them
    states = cache.states(FrozenBlockFeatures(variant(0), trainable_blocks=1), tokenizer, task, "dev", 48, cpu, 8)
    assert calls == [1, 1] and len(states) == len(task.texts("dev"))  # block 0 differs: encoded again


def test_caching_frozen_blocks_needs_frozen_blocks_and_leaves_old_fingerprints_alone():
    with pytest.raises(ValueError, match="trainable_blocks"):
        FinetuneConfig(cache_frozen_blocks=True)
    assert "cache_frozen_blocks" not in fingerprint_dump(FinetuneConfig(trainable_blocks=2))
    assert fingerprint_dump(FinetuneConfig(trainable_blocks=2, cache_frozen_blocks=True))["cache_frozen_blocks"]


def test_stream_tokens_count_the_rows_epoch_rows_hands_out():
    lengths = np.random.default_rng(1).integers(3, 90, size=37)
    for batches in (0, 1, 4, 5, 12, 23):  # 5 batches per epoch: within the first epoch, whole epochs, beyond
        expected = sum(int(lengths[loop.epoch_rows(37, 8, 4, index)].sum()) for index in range(batches))
        assert loop.stream_tokens(lengths, 8, 4, batches) == expected


def test_a_sentence_model_without_an_mlm_head_loads_with_one_line_in_iss_words(capfd, caplog) -> None:
    """all-MiniLM-L6-v2 is saved without its MLM head, which iss fits on purpose: no transformers load report, no
    "checkpoint seem corrupted", one iss line, said once however often the checkpoint is loaded."""
    require_shared()
    path = str(SHARED.parent / "models" / "all-MiniLM-L6-v2")
    iss_model.TaskModel.load(path, num_labels=3)  # another test may have loaded it already: the report is said once
    iss_model._REPORTED.discard(path)
    with caplog.at_level("INFO", logger="iss"):
        for _ in range(2):
            iss_model.TaskModel.load(path, num_labels=3)
    printed = capfd.readouterr()
    assert "LOAD REPORT" not in printed.err + printed.out and "corrupted" not in printed.err + printed.out
    assert [r.getMessage() for r in caplog.records].count(
        f"{path} has no saved LM head: a fresh one is made (model.mlm_head_steps fits it)"
    ) == 1
