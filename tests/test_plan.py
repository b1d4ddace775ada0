"""The run plan names every stage of `iss run` once: methods x budgets x seeds, and what each reads."""

from __future__ import annotations

from iss.config.io import recorded_config
from iss.config.schema import IssConfig
from iss.stages.plan import RunPlan, finetune_stage, influence_stage, mechanism_stage


def _config(**evaluation) -> IssConfig:
    return IssConfig(evaluation={"methods": ["iss", "iss-cosine", "iss-batched", "tlm", "none"], **evaluation})


def test_the_plan_lists_every_fine_tuning_run_with_the_stages_it_rests_on():
    plan = RunPlan(_config(pretrain_seeds=[0, 5]).with_overrides({"finetune.seeds": [0, 1]}))
    runs = {(run.method, run.pretrain_seed, run.seed): run for run in plan.runs}
    assert len(plan.runs) == 4 * 2 * 2 + 2  # pretrained methods x pretraining seeds x fine-tuning seeds + none
    assert runs["iss-cosine", 5, 1].finetune == "finetune-iss-cosine-pretrain5-seed1"
    assert runs["iss-cosine", 5, 1].pretrain == "pretrain-iss-cosine-seed5"
    assert runs["iss-cosine", 5, 1].select == "select-iss-cosine"
    assert runs["tlm", 0, 0].finetune == "finetune-tlm-seed0"  # the pretraining seed equals it: the plain name
    assert runs["none", None, 1].finetune == "finetune-none-seed1" and runs["none", None, 1].pretrain is None
    assert len(plan.pretrainings()) == 8 and len(plan.subsets()) == 4
    assert plan.subset_of("pretrain-tlm-seed5").select == "select-tlm"
    assert plan.influence_stages() == ["influence", "influence-cosine", "influence-bp4-bt8-random"]


def test_one_pretraining_per_method_keeps_the_plain_fine_tuning_names():
    plan = RunPlan(IssConfig(evaluation={"methods": ["tlm"], "repeat_pretraining": False}))
    assert [(run.pretrain_seed, run.finetune) for run in plan.runs] == [
        (0, "finetune-tlm-seed0"),
        (0, "finetune-tlm-seed1"),
        (0, "finetune-tlm-seed2"),
    ]
    assert plan.pretrainings() == ["pretrain-tlm-seed0"]


def test_a_budget_sweep_tags_the_pretrained_methods_stages_and_the_kinds_cover_the_estimate():
    plan = RunPlan(_config(budgets=["12.5%", "4000 docs"], mechanism_steps=2, mechanism_repeats=2))
    subsets = [run.select for run in plan.subsets()]
    assert "select-iss@12.5pct" in subsets and "select-tlm@4000docs" in subsets and len(subsets) == 8
    kinds = plan.stages_by_kind()
    assert kinds["warm-up"] == ["warmup"] and kinds["MLM head fit"] == []
    assert "mechanism-iss-cosine@12.5pct-repeat1" in kinds["mechanism check"]
    assert kinds["mechanism check"][-1] == "mechanism-none" and len(kinds["mechanism check"]) == 8 * 2 + 1
    assert kinds["fine-tuning"] == [run.finetune for run in plan.runs]
    gate = RunPlan(IssConfig(evaluation={"methods": ["tlm", "random-corpus", "none"]})).stages_by_kind()
    assert gate["warm-up"] == [] and gate["influence"] == []  # nothing reads a warm-up there


def test_stage_names_come_from_one_builder():
    assert finetune_stage(None, "", 3) == "finetune-none-seed3"
    assert mechanism_stage("tlm", "@layer1", 2) == "mechanism-tlm@layer1-repeat2"
    settings = IssConfig().influence.model_copy(update={"layer": 1, "similarity": "cosine"})
    assert influence_stage(settings) == "influence-layer1-cosine"


def test_a_config_recorded_by_an_older_version_still_gives_its_plan():
    """A manifest's config may hold keys this version dropped (evaluation.bootstrap): the plan reads the rest."""
    recorded = IssConfig(evaluation={"methods": ["tlm", "none"]}).model_dump(mode="json")
    recorded["evaluation"]["bootstrap"] = 10000
    plan = RunPlan(recorded_config(recorded))
    assert [run.finetune for run in plan.runs][:2] == ["finetune-tlm-seed0", "finetune-tlm-seed1"]
