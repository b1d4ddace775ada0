"""The up-front time estimate of `iss run`: it counts the runs the config asks for and prices their tokens."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from iss import cli
from iss.config.schema import IssConfig
from iss.pipeline import calibration, estimate
from iss.pipeline.estimate import estimate_run
from iss.pipeline.run import Pipeline
from iss.runs.folder import RunFolder
from iss.stages import train
from iss.stages.plan import RunPlan
from iss.stages.price import FORWARD_SHARE, padded_tokens
from iss.training.loop import encoded_lengths

from .test_pipeline import _small_config


def test_padded_tokens_pad_each_batch_to_its_longest_row():
    lengths = np.array([3, 10, 4, 4])
    assert padded_tokens(lengths, [np.array([0, 1]), np.array([2, 3])]) == 2 * 10 + 2 * 4


@pytest.fixture()
def fixed_price(monkeypatch, tmp_path):
    """A machine at one microsecond per token that has calibrated nothing yet (its own ``ISS_CACHE``: the suite's
    runs calibrate stage factors), so estimates are token counts in disguise."""
    monkeypatch.setattr(estimate, "probe_seconds_per_token", lambda *args: 1e-6)
    monkeypatch.setenv("ISS_CACHE", str(tmp_path / "uncalibrated"))


def test_estimate_counts_the_runs_the_config_asks_for(tmp_path, tokenizer, fixed_price):
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    config = _small_config(
        tmp_path / "run",
        tokenizer={"path": str(tmp_path / "tok")},
        finetune={"seeds": [0, 1, 2]},
        evaluation={"methods": ["iss", "iss-cosine", "tlm", "none"]},
    )
    pipeline = Pipeline(config, show_progress=False)
    repeated = estimate_run(pipeline, with_pool=True)
    measured = sum(pipeline.results[name].summary["seconds"] for name in ("data", "tokenizer", "retrieval"))
    assert repeated.seconds["data, tokenizer, retrieval"] == pytest.approx(measured)  # known exactly by now
    assert repeated.seconds["selection"] == pytest.approx(3 * calibration.Calibration.load().select_seconds)
    counted = ("warm-up", "influence", "pretraining", "fine-tuning", "selection")
    assert [repeated.runs[kind] for kind in counted] == [1, 2, 9, 12, 3]  # dot, cosine apart
    once = estimate_run(Pipeline(config.with_overrides({"evaluation.repeat_pretraining": False}), False), True)
    assert once.runs["pretraining"] == 3
    assert once.seconds["pretraining"] == pytest.approx(repeated.seconds["pretraining"] / 3)
    assert once.seconds["fine-tuning"] == pytest.approx(repeated.seconds["fine-tuning"])
    assert "min on this machine" in repeated.describe() and repeated.total == sum(repeated.seconds.values())
    assert "with the BM25 pool" in repeated.describe() and not repeated.forecast
    checked = config.with_overrides({"evaluation.mechanism_steps": 2})
    mechanism = [
        estimate_run(Pipeline(checked.with_overrides({"evaluation.mechanism_repeats": r}), False)).seconds[
            "mechanism check"
        ]
        for r in (1, 2, 3)
    ]
    assert mechanism[1] > mechanism[0]
    assert mechanism[2] - mechanism[0] == pytest.approx(2 * (mechanism[1] - mechanism[0]))
    grid = estimate_run(Pipeline(config.with_overrides({"evaluation.pretrain_seeds": [0, 1]}), False))
    assert [grid.runs[kind] for kind in counted] == [1, 2, 6, 21, 3]  # 3 x 2 x 3 + 3
    gate = estimate_run(
        Pipeline(config.with_overrides({"evaluation.methods": ["tlm", "random-corpus", "none"]}), False)
    )
    assert gate.seconds["warm-up"] == 0 and gate.runs["influence"] == gate.runs["warm-up"] == 0  # nothing reads it


def test_packing_prices_full_rows_and_buckets_price_less_padding(tmp_path, tokenizer, fixed_price):
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    config = _small_config(
        tmp_path / "run",
        tokenizer={"path": str(tmp_path / "tok")},
        model={"max_length": 256},  # no ChemProt text truncated, so lengths (and padding) vary
        pretrain={"steps": 10, "batch_size": 4, "objective": "mlm"},
        evaluation={"methods": ["iss"]},  # ISS reads a warm-up
        finetune={"seeds": [0]},
    )
    packed = estimate_run(Pipeline(config.with_overrides({"pretrain.packing": True}), False))
    assert packed.seconds["pretraining"] == pytest.approx(10 * 4 * 256 * 1e-6)  # every row max_length tokens
    unpacked = estimate_run(Pipeline(config, False))
    assert 0 < unpacked.seconds["pretraining"] <= packed.seconds["pretraining"]
    bucketed = estimate_run(Pipeline(config.with_overrides({"warmup.length_buckets": True}), False))
    assert bucketed.seconds["warm-up"] < unpacked.seconds["warm-up"]


def test_cached_frozen_blocks_price_one_whole_model_pass_on_top_of_the_steps(tmp_path, tokenizer, fixed_price):
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    config = _small_config(
        tmp_path / "run",
        tokenizer={"path": str(tmp_path / "tok")},
        finetune={"seeds": [0, 1], "trainable_blocks": 1},
        evaluation={"methods": ["tlm"], "repeat_pretraining": False},
    )
    plain = estimate_run(Pipeline(config, False))
    cached = estimate_run(Pipeline(config.with_overrides({"finetune.cache_frozen_blocks": True}), False))
    task = Pipeline(config, False).task()
    lengths = [encoded_lengths(tokenizer, task.texts(split), 48) for split in ("train", "dev", "test")]
    tokens = sum(int(split.sum()) for split in lengths)
    extra = cached.seconds["fine-tuning"] - plain.seconds["fine-tuning"]
    assert extra == pytest.approx(tokens * FORWARD_SHARE * 1e-6)  # two seeds of one pretrained model
    repeated = config.with_overrides({"finetune.cache_frozen_blocks": True, "evaluation.repeat_pretraining": True})
    extra_repeated = estimate_run(Pipeline(repeated, False)).seconds["fine-tuning"] - plain.seconds["fine-tuning"]
    assert extra_repeated == pytest.approx(2 * extra)  # a pretrained model per seed
    with_none = config.with_overrides({"finetune.cache_frozen_blocks": True, "evaluation.methods": ["tlm", "none"]})
    extra_none = estimate_run(Pipeline(with_none, False)).seconds["fine-tuning"] - cached.seconds["fine-tuning"]
    plain_none = estimate_run(Pipeline(config.with_overrides({"evaluation.methods": ["tlm", "none"]}), False))
    none_runs = plain_none.seconds["fine-tuning"] - plain.seconds["fine-tuning"]
    assert extra_none - none_runs == pytest.approx(2 * tokens * FORWARD_SHARE * 1e-6)  # one per seed


def test_the_fine_tuning_probe_times_the_cached_path_when_caching(tmp_path, tokenizer, monkeypatch):
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    config = _small_config(
        tmp_path / "run",
        tokenizer={"path": str(tmp_path / "tok")},
        finetune={"trainable_blocks": 1, "cache_frozen_blocks": True},
    )
    pipeline = Pipeline(config, False)
    calls = []
    original = estimate.FrozenBlockFeatures.logits
    monkeypatch.setattr(estimate.FrozenBlockFeatures, "logits", lambda *a: calls.append(1) or original(*a))
    task = pipeline.task()
    seconds = estimate.probe_seconds_per_token(
        pipeline, task, tokenizer, task.texts("train"), task.label_ids("train"), "task", 1
    )
    assert seconds > 0 and len(calls) == estimate.PROBE_STEPS + 1


def test_warm_up_and_pretraining_are_priced_by_probes_that_train_what_they_train(tmp_path, tokenizer, monkeypatch):
    """A 135 M model whose warm-up trains its top 2 blocks costs a fraction of a whole-model step: each stage's
    probe trains that stage's blocks (one probe per distinct setting), forward-only passes keep the whole model's."""
    calls = []

    def probe(pipeline, task, tokenizer, texts, labels, objective, blocks=None):
        calls.append((objective, blocks))
        return {None: 4e-6, 1: 1e-6}[blocks] if objective == "joint" else 2e-6

    monkeypatch.setattr(estimate, "probe_seconds_per_token", probe)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    config = _small_config(tmp_path / "run", tokenizer={"path": str(tmp_path / "tok")})
    whole = estimate_run(Pipeline(config, False), with_pool=True)
    assert calls == [("joint", None), ("task", None)]  # nothing trains fewer blocks: two probes, as before
    assert whole.seconds_per_token == {"joint": 4e-6, "warm-up": 4e-6, "pretraining": 4e-6, "task": 2e-6}
    calls.clear()
    top = config.with_overrides({"warmup.trainable_blocks": 1, "pretrain.trainable_blocks": 1})
    partial = estimate_run(Pipeline(top, False), with_pool=True)
    assert calls == [("joint", None), ("joint", 1), ("task", None)]
    assert partial.seconds["warm-up"] == pytest.approx(whole.seconds["warm-up"] / 4)
    assert partial.seconds["pretraining"] == pytest.approx(whole.seconds["pretraining"] / 4)
    assert partial.seconds["influence"] == pytest.approx(whole.seconds["influence"])


def test_each_kind_costs_its_stages_declared_price_times_the_probe_and_this_machines_factor(
    tmp_path, tokenizer, monkeypatch
):
    """The estimate knows nothing a stage does not declare (iss.stages' prices): per kind of stage, its tokens per
    probe x the probe's seconds per token x this machine's factor for that kind; a price follows its own settings."""
    monkeypatch.setenv("ISS_CACHE", str(tmp_path / "cache"))
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    config = _small_config(
        tmp_path / "run",
        tokenizer={"path": str(tmp_path / "tok")},
        finetune={"seeds": [0, 1], "cache_frozen_blocks": True, "trainable_blocks": 1},
        evaluation={"methods": ["iss", "tlm", "none"], "mechanism_steps": 2},
    )
    factors = {"warm-up": 2.0, "influence": 3.0, "pretraining": 0.5, "fine-tuning": 1.5, "mechanism check": 0.25}
    calibration.Calibration.path().parent.mkdir(parents=True)
    calibrated = {"stage_factors": {calibration.model_key(config): factors}}
    calibration.Calibration.path().write_text(json.dumps(calibrated), encoding="utf-8")
    per_token = {"joint": 4e-6, "warm-up": 3e-6, "pretraining": 2e-6, "task": 1e-6}
    pipeline = Pipeline(config, show_progress=False)
    estimated = estimate_run(pipeline, with_pool=True, seconds_per_token=per_token)

    pool = pq.read_table(pipeline.retrieval().path / "pool.parquet", columns=["text"]).column("text").to_pylist()
    run_tokenizer = pipeline.read_tokenizer()
    lengths = encoded_lengths(run_tokenizer, pool, config.model.max_length)
    work = estimate.measure_workload(pipeline, pipeline.task(), run_tokenizer, lengths)
    prices = estimate.stage_prices(work)
    assert [price.kind for price in prices] == list(factors)
    for price in prices:
        expected = sum(tokens * per_token[probe] for probe, tokens in price.tokens.items()) * factors[price.kind]
        assert expected > 0 and estimated.seconds[price.kind] == pytest.approx(expected, rel=1e-12)
        assert estimated.runs[price.kind] == price.runs
    assert set(train.finetune_price(work).tokens) == {"task", "joint"}  # the frozen blocks' encodings: whole model

    longer = estimate.measure_workload(
        pipeline.variant({"pretrain.steps": 2 * config.pretrain.steps}), pipeline.task(), run_tokenizer, lengths
    )
    twice = train.pretrain_price(longer).tokens["pretraining"]
    assert twice == pytest.approx(2 * train.pretrain_price(work).tokens["pretraining"])
    assert train.finetune_price(longer) == train.finetune_price(work)


@pytest.mark.parametrize("show_progress", [True, False])
def test_iss_run_says_the_estimate_before_any_stage_and_again_with_the_pool(
    monkeypatch, capsys, tmp_path, show_progress
):
    events = []
    monkeypatch.setenv("ISS_CACHE", str(tmp_path / "cache"))

    class Recorder:
        run = RunFolder(tmp_path / "run")
        config = IssConfig(evaluation={"methods": ["iss", "tlm", "none"]})

        def retrieval(self):
            events.append("retrieval")

        def run_all(self):
            events.append("run_all")
            stages = {name: {"summary": {"seconds": s}} for name, s in (("select-iss", 9.0), ("select-tlm", 3.0))}
            (tmp_path / "run" / "manifest.json").write_text(json.dumps({"stages": stages}), encoding="utf-8")
            return "results"

    Recorder.show_progress = show_progress

    def estimated(pipeline, with_pool=False, seconds_per_token=None):
        events.append(f"estimate with_pool={with_pool}")
        assert with_pool == (seconds_per_token is not None)  # the probes run once
        warm_up = 120.0 if with_pool else 90.0
        return estimate.RunEstimate({"warm-up": warm_up}, {}, {"joint": 1e-6, "task": 1e-6}, forecast=not with_pool)

    def learn(pipeline, manifest):
        events.append("calibrate")
        return calibration.Calibration.learn(manifest, RunPlan(pipeline.config))

    monkeypatch.setattr(estimate, "estimate_run", estimated)  # the CLI imports them when the command runs
    monkeypatch.setattr(estimate, "learn_from_run", learn)
    assert cli._run_all_estimated(Recorder()) == "results"
    assert events == ["estimate with_pool=False", "retrieval", "estimate with_pool=True", "run_all", "calibrate"]
    said = capsys.readouterr().err.replace("\n", " ")
    assert ("before any stage, pool forecast): 1.5 min" in said) == show_progress  # --quiet says nothing
    assert ("(with the BM25 pool): 2.0 min" in said) == show_progress
    assert estimate.RunEstimate.load(tmp_path / "run" / estimate.FORECAST_FILE).seconds == {"warm-up": 90.0}
    assert estimate.RunEstimate.load(tmp_path / "run" / estimate.ESTIMATE_FILE).seconds == {"warm-up": 120.0}
    assert calibration.Calibration.load().select_seconds == 6.0  # the median of the run's selections, kept


def test_before_any_stage_the_pool_is_forecast_and_one_run_calibrates_it(tmp_path, tokenizer, fixed_price, monkeypatch):
    """Nothing runs before the first estimate; after one run on a corpus the forecast has the pool's real size, a
    mean length near the real one, and the input stages priced by what they took."""
    monkeypatch.setenv("ISS_CACHE", str(tmp_path / "cache"))
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    config = _small_config(tmp_path / "run", tokenizer={"path": str(tmp_path / "tok")})
    pipeline = Pipeline(config, show_progress=False)
    first = estimate_run(pipeline)
    assert pipeline.results == {} and not (tmp_path / "run" / "manifest.json").exists()  # no stage ran
    assert first.forecast and first.unpriced == (calibration.INPUT_STAGES,) and "not priced yet" in first.describe()

    pipeline.tokenizer(), pipeline.retrieval()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text(encoding="utf-8"))
    learned = estimate.learn_from_run(pipeline, manifest)
    summary = pipeline.retrieval().summary
    assert learned.pool_share == pytest.approx(summary["pool_docs"] / summary["hits"])
    key = calibration.hits_key(calibration.corpus_key(config), config.retrieval.top_k)
    assert learned.pool_shares == {key: learned.pool_share}  # another corpus or top-k: the last run's
    again = Pipeline(config, show_progress=False)
    second = estimate_run(again)
    inputs = sum(manifest["stages"][name]["summary"]["seconds"] for name in ("data", "tokenizer", "retrieval"))
    assert second.unpriced == () and second.seconds[calibration.INPUT_STAGES] == pytest.approx(inputs)
    queries, corpus = len(pipeline.task().texts("train")), calibration.corpus_key(config)
    forecast = estimate.forecast_pool_lengths(config, tokenizer, queries, calibration.Calibration.load(), corpus)
    pool = pq.read_table(pipeline.retrieval().path / "pool.parquet", columns=["text"]).column("text").to_pylist()
    real = encoded_lengths(tokenizer, pool, config.model.max_length)
    assert len(forecast) == len(real)
    assert forecast.mean() == pytest.approx(real.mean(), rel=0.25)


def test_estimate_is_held_against_the_manifests_stage_timings():
    predicted = estimate.RunEstimate(
        {"warm-up": 10.0, "pretraining": 40.0, "fine-tuning": 50.0}, {"pretraining": 2}, {"joint": 1e-6}
    )
    manifest = {
        "stages": {
            "retrieval": {"summary": {"seconds": 99.0}},  # not priced: left out
            "warmup": {"summary": {"seconds": 12.0}},
            "pretrain-iss-seed0": {"summary": {"seconds": 15.0}},
            "pretrain-tlm-seed0": {"summary": {"seconds": 30.0}},
            "finetune-none-seed0": {"summary": {"seconds": 20.0}},
            "select-iss": {"summary": {"seconds": 1.0}},
        }
    }
    plan = RunPlan(IssConfig(evaluation={"methods": ["iss", "tlm", "none"]}, finetune={"seeds": [0]}))
    rows = predicted.against(manifest, plan)
    assert rows["pretraining"] == {"estimated": 40.0, "measured": 45.0}
    assert rows["fine-tuning"] == {"estimated": 50.0, "measured": 20.0}
    assert rows["total"] == {"estimated": 100.0, "measured": 77.0}

    with_pool = estimate.RunEstimate(
        {**predicted.seconds, "selection": 2.0}, {}, {"joint": 1e-6}, factors={"pretraining": 1.5}
    )
    beside = with_pool.against_with_forecast(predicted, manifest, plan)  # the forecast priced no selection
    assert beside["pretraining"] == {"estimated": 40.0, "measured": 45.0, "forecast": 40.0, "factor": 1.5}
    assert beside["selection"] == {"estimated": 2.0, "measured": 1.0, "forecast": 0.0, "factor": None}
    assert beside["total"]["forecast"] == 100.0 and beside["total"]["estimated"] == 102.0


def test_a_finished_run_calibrates_each_probed_kind_of_stage_for_its_model(
    tmp_path, tokenizer, fixed_price, monkeypatch
):
    """The probes price one batch's fastest step; a run's stages took longer. Its manifest against its estimate
    (divided by the factors that estimate applied) sets each kind's factor for that model, and the next estimate
    of that model multiplies by it; another model keeps the probes' price."""
    monkeypatch.setenv("ISS_CACHE", str(tmp_path / "cache"))
    config = IssConfig(evaluation={"methods": ["iss", "tlm", "none"]}, finetune={"seeds": [0]})
    plan = RunPlan(config)
    manifest = {
        "stages": {
            "warmup": {"summary": {"seconds": 15.0}},
            "pretrain-iss-seed0": {"summary": {"seconds": 20.0}},
            "pretrain-tlm-seed0": {"summary": {"seconds": 20.0}},
        }
    }
    applied = estimate.RunEstimate(
        {"warm-up": 20.0, "selection": 9.0, "fine-tuning": 5.0}, {}, {"joint": 1e-6}, factors={"warm-up": 2.0}
    )
    learned = calibration.Calibration.learn(manifest, plan, estimate=applied)
    factors = learned.stage_factors[calibration.model_key(config)]
    # 15 s over 20 / 2; selection is not priced by the probes, and no fine-tuning stage ran
    assert factors == {"warm-up": pytest.approx(1.5)}
    older = estimate.RunEstimate({"pretraining": 80.0}, {}, {"joint": 1e-6})  # an estimate.json without factors
    factors = calibration.Calibration.learn(manifest, plan, estimate=older).stage_factors[calibration.model_key(config)]
    assert factors == {"warm-up": pytest.approx(1.5), "pretraining": pytest.approx(0.5)}  # the earlier one kept

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    small = _small_config(tmp_path / "run", tokenizer={"path": str(tmp_path / "tok")})
    plain = estimate_run(Pipeline(small, show_progress=False), with_pool=True)
    assert set(plain.factors.values()) == {1.0}
    model = calibration.model_key(small)
    write = {"stage_factors": {model: {"warm-up": 3.0, "fine-tuning": 0.5}}}
    calibration.Calibration.path().write_text(json.dumps(write), encoding="utf-8")
    scaled = estimate_run(
        Pipeline(small, show_progress=False), with_pool=True, seconds_per_token=plain.seconds_per_token
    )
    assert scaled.seconds["warm-up"] == pytest.approx(3.0 * plain.seconds["warm-up"])
    assert scaled.seconds["fine-tuning"] == pytest.approx(0.5 * plain.seconds["fine-tuning"])
    assert scaled.seconds["pretraining"] == pytest.approx(plain.seconds["pretraining"])
    assert scaled.factors["warm-up"] == 3.0
    assert "scaled by an earlier run" in scaled.describe() and "scaled" not in plain.describe()
    saved = tmp_path / "estimate.json"
    scaled.save(saved)
    assert estimate.RunEstimate.load(saved) == scaled
    other = small.with_overrides({"model.num_layers": small.model.num_layers + 1})
    assert calibration.model_key(other) != model and set(
        estimate_run(Pipeline(other, False), True).factors.values()
    ) == {1.0}


def test_fine_tuning_encodes_the_frozen_blocks_once_per_distinct_model_and_shares_untouched_blocks():
    """30 blocks, fine-tuning the top 2 on cached states, pretraining the top 4 of a checkpoint: blocks 1-26 are
    the checkpoint's in every model (encoded once), each of the 6 pretrained models and the checkpoint itself (its
    3 seeds without pretraining share it) adds blocks 27-28. From scratch every unpretrained seed is a model."""
    settings = {
        "model": {"path": "some/checkpoint", "freeze_embeddings": True},
        "pretrain": {"trainable_blocks": 4},
        "finetune": {"trainable_blocks": 2, "cache_frozen_blocks": True, "seeds": [0, 1, 2]},
        "evaluation": {"methods": ["iss", "tlm", "none"]},
    }
    config = IssConfig(**settings)

    def encodings(settings: IssConfig) -> float:
        return train.frozen_encodings(SimpleNamespace(config=settings, plan=RunPlan(settings), blocks=30))

    assert encodings(config) == pytest.approx(26 / 28 + 7 * 2 / 28)
    whole = config.with_overrides({"pretrain.trainable_blocks": None})
    assert encodings(whole) == 7
    assert encodings(whole.with_overrides({"model.path": None})) == 9
