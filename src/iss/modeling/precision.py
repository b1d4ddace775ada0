"""Numerics and device: the run's precision (fp32 or bf16 autocast, one context for a stage body),
the autocast a forward pass runs under, and the device picked from the config.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from iss.errors import ConfigError

_PRECISION: ContextVar[str] = ContextVar("iss_precision", default="fp32")

log = logging.getLogger("iss")


@contextmanager
def precision(name: str) -> Iterator[None]:
    """Run the enclosed work's forward passes in ``name``: 'fp32', or 'bf16' (autocast to bfloat16; parameters,
    optimiser state and gradient dot products stay float32). The pipeline wraps every model stage in it."""
    if name not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be 'fp32' or 'bf16', got {name!r}")
    token = _PRECISION.set(name)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def current_precision() -> str:
    return _PRECISION.get()


def forward_autocast(device: torch.device | str) -> torch.autocast:
    """Autocast for one forward pass and its loss under the current precision (backward runs outside it, as
    PyTorch recommends). On CPU, bf16 autocast runs the same code path as on GPU."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=_PRECISION.get() == "bf16")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
