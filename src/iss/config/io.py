"""Reading a config: YAML with defaults filled in, paths resolved against the file's folder, an empty file or
a non-section value refused in one line, and a run's recorded config read back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from iss.config.schema import IssConfig, _section_model, validate
from iss.errors import ConfigError


def load_config(path: str | Path | None = None) -> IssConfig:
    """Parse a YAML config; relative data paths are resolved against the config file's folder."""
    if path is None:
        return IssConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())[:200]
        raise ConfigError(
            f"{path}: not a YAML config{line}: {problem}; `iss config` prints one to start from"
        ) from None
    if raw is None or raw == {}:
        raise ConfigError(
            f"{path}: the config is empty; leave out the file for the default job, or start from `iss config`"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections")
    _resolve_paths(raw, path.parent)
    return validate(raw, str(path))


def recorded_config(data: dict[str, Any]) -> IssConfig:
    """The config a run folder's manifest recorded, read by this version: keys an older version had and this one
    dropped (``evaluation.bootstrap``) are left out, so old run folders stay readable (reports, plans)."""

    def known(model: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
        kept = {}
        for key, value in values.items():
            field = model.model_fields.get(key)
            if field is None:
                continue
            section = _section_model(field)
            kept[key] = known(section, value) if section is not None and isinstance(value, dict) else value
        return kept

    return IssConfig.model_validate(known(IssConfig, data))


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    def resolve(value: str) -> str:
        candidate = base / value
        return str(candidate.resolve()) if not Path(value).is_absolute() and candidate.exists() else value

    for section, value in raw.items():
        model = _section_model(IssConfig.model_fields.get(section))
        if model is not None and not isinstance(value, dict | None):
            keys = ", ".join(list(model.model_fields)[:3])
            raise ConfigError(
                f"{section}: must be a section (a mapping of keys such as {keys}), got {type(value).__name__} {value!r}"
            )
    task = raw.get("task") or {}
    if isinstance(task.get("path"), str):
        task["path"] = resolve(task["path"])
    corpus = raw.get("corpus") or {}
    if isinstance(corpus.get("paths"), list):
        corpus["paths"] = [resolve(p) if isinstance(p, str) else p for p in corpus["paths"]]
    if isinstance(corpus.get("mixture"), str):  # a mixture kept in a file of its own, shared by configs
        mixture = Path(resolve(corpus["mixture"]))
        if not mixture.is_file():
            raise ConfigError(f"corpus.mixture: file not found: {mixture}")
        corpus["mixture"] = yaml.safe_load(mixture.read_text(encoding="utf-8")) or {}
    for section in ("tokenizer", "model"):
        if isinstance((raw.get(section) or {}).get("path"), str):
            raw[section]["path"] = resolve(raw[section]["path"])
    knn = (raw.get("selectors") or {}).get("knn") or {}
    if isinstance(knn.get("model"), str):
        knn["model"] = resolve(knn["model"])
