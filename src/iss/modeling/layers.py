"""Which layer influence is measured at: one resolution of ``influence.layer`` for the config check, the scorer and
the layer ablation, so 'last', a block number and 'embeddings' mean the same everywhere."""

from __future__ import annotations

from dataclasses import dataclass

from iss.errors import ConfigError


@dataclass(frozen=True)
class Layer:
    """A resolved ``influence.layer``: the embeddings, or transformer block ``index`` (1-based) of ``blocks``."""

    index: int | None  # None: the embeddings
    blocks: int

    @property
    def name(self) -> str:
        """The parameter group's name in influence summaries: ``embeddings`` or ``blockN``."""
        return "embeddings" if self.index is None else f"block{self.index}"

    @property
    def is_last(self) -> bool:
        """The default layer: its stages keep the plain names (``influence``, ``select-iss``)."""
        return self.index == self.blocks


def resolve_layer(layer: str | int, blocks: int) -> Layer:
    """``'last'``, ``'embeddings'`` or a 1-based block number, checked against a model of ``blocks`` blocks."""
    if layer == "embeddings":
        return Layer(None, blocks)
    index = blocks if layer == "last" else int(layer)
    if not 1 <= index <= blocks:
        raise ConfigError(f"influence.layer {layer} is out of range: the model has blocks 1..{blocks}")
    return Layer(index, blocks)
