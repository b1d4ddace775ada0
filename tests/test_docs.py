"""The README and docs/ say what the code does: the command table, the example config, the config reference."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from iss.cli import commands_markdown
from iss.config.reference import reference_markdown
from iss.config.schema import IssConfig, _is_section, validate

from .conftest import REPO, SHARED, require_shared

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_the_readme_command_table_is_the_clis():
    """The table between the markers is what `iss --help` registers (a command added or renamed must show)."""
    block = re.search(r"<!-- commands:.*?-->\n(.*?)<!-- /commands -->", README, re.S).group(1)
    assert block == commands_markdown()
    assert "`iss export`" in block and "`iss analyze layers`" in block and "random-corpus, iss-bottom" in block


def test_the_readme_stays_short_and_its_example_config_is_valid():
    assert len(README.splitlines()) <= 200
    section = README[README.index("## Your own task, corpus and model") :]
    raw = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    require_shared()
    text = yaml.safe_dump(raw).replace("../shared/", f"{SHARED.parent}/")
    config = validate(yaml.safe_load(text), "README example")
    assert config.evaluation.pretrain_seeds == [0, 1, 2] and config.corpus.mixture.exclude == ["wiki_*"]
    assert all(Path(p).exists() for p in (config.task.path, *config.corpus.paths, config.model.path))
    causal = validate(yaml.safe_load(re.findall(r"```yaml\n(.*?)```", section, re.S)[1]), "README causal example")
    assert causal.model.path == causal.tokenizer.path and causal.warmup.trainable_blocks == 2


def test_the_config_reference_is_current_and_every_key_says_what_it_does():
    assert (REPO / "docs" / "configuration.md").read_text(encoding="utf-8") == reference_markdown()

    def undescribed(model, prefix=""):
        for name, field in model.model_fields.items():
            if _is_section(field.annotation) and name != "budget":
                yield from undescribed(field.annotation, f"{prefix}{name}.")
            elif not field.description:
                yield prefix + name

    assert list(undescribed(IssConfig)) == []
