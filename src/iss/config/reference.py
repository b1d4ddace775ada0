"""The config's key reference (``iss config --reference``, docs/config.md), generated from the schema
so it cannot drift from it.
"""

from __future__ import annotations

from typing import Any, get_args

import yaml
from pydantic import BaseModel

from iss.config.schema import IssConfig, _is_section


def reference_markdown() -> str:
    """Every config key with its type, default and description, section by section, from the models above: the
    text of docs/configuration.md (`iss config --reference`; a test keeps that file current)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config models (`iss config --reference > docs/configuration.md`); `iss config CONFIG`",
        "prints a whole config with its defaults filled in. Keys are set in the YAML file or with",
        "`--set section.key=value` (YAML values: `--set finetune.seeds=[0,1,2]`, `--set selection.budget='20%'`,",
        "`--set corpus.mixture.weights='{bio_*: 0.1}'`).",
        "",
    ]
    top = [(name, field) for name, field in IssConfig.model_fields.items() if not _is_section(field.annotation)]
    lines += _reference_table("", top)
    for name, field in IssConfig.model_fields.items():
        if _is_section(field.annotation):
            section = field.annotation
            lines += ["", f"## `{name}`", "", _first_line(section.__doc__), ""]
            lines += _reference_table(f"{name}.", list(section.model_fields.items()))
            for key, inner in section.model_fields.items():
                options = get_args(inner.annotation)  # an optional section (corpus.mixture) is listed under its parent
                nested = [t for t in options if _is_section(t)] if type(None) in options else []
                if nested:
                    lines += ["", f"### `{name}.{key}`", "", _first_line(nested[0].__doc__), ""]
                    lines += _reference_table(f"{name}.{key}.", list(nested[0].model_fields.items()))
    return "\n".join(lines) + "\n"


def _reference_table(prefix: str, fields: list) -> list[str]:
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for name, field in fields:
        default = field.default_factory() if field.default_factory else field.default
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        text = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{prefix}{name}` | `{json_default(default)}` | {text} |")
    return rows


def json_default(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _first_line(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())
