"""Data-parallel training over the processes ``accelerate launch --multi_gpu`` (or torchrun) starts: DDP's
arithmetic, by hand.

Every process builds the same global batch (a pure function of seed and step, masks keyed by row), keeps its
share of the rows and scales its loss by 1 / (global rows); after backward the gradients are summed across
processes, so each one holds the gradient of the global batch's mean loss and takes the same optimizer step.
A step's result is that of one process up to float summation order and dropout masks (each process draws its
own). Stages run in lockstep: every process decides from the same run folder whether a stage is finished; the
training stages run on all processes, the others on the main one while the rest wait; only the main process
writes the run folder. Several machines need the run folder on a shared file system.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

STAGE_TIMEOUT = timedelta(hours=48)  # others wait at a barrier while the main process runs a selection stage


@dataclass(frozen=True)
class Processes:
    """This process's place in the group: rank ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, rows: np.ndarray) -> np.ndarray:
        """This process's rows of a global batch (every ``world``-th, from ``rank``). A batch with fewer rows than
        processes (an epoch's last) leaves some without rows: they get the first row as a stand-in, which
        :meth:`mean` weighs 0, so every process still runs the same forward, backward and collectives."""
        mine = rows[self.rank :: self.world]
        return mine if len(mine) else rows[:1]

    def mean(self, values: torch.Tensor, everyone: np.ndarray) -> torch.Tensor:
        """This process's part of the mean over the global batch ``everyone`` (one process: the mean)."""
        if not self.distributed:
            return values.mean()
        weight = 1.0 if self.rank < len(everyone) else 0.0  # 0: the stand-in row of an empty share
        return values.sum() * (weight / len(everyone))

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sum every gradient across processes, in one flat buffer (one collective per step)."""
        if not self.distributed:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        for grad, summed in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(summed.view_as(grad))

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """Logged loss parts summed across processes: each holds its share of the global mean."""
        if not self.distributed or not values:
            return values
        tensor = torch.tensor(list(values.values()), dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return dict(zip(values, tensor.tolist(), strict=True))

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def device(self, configured: torch.device) -> torch.device:
        """The device of this process: on GPUs the one of its local rank (one GPU per process)."""
        if not self.distributed or configured.type != "cuda":
            return configured
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@functools.cache
def processes() -> Processes:
    """The process group from the environment the launcher sets (``accelerate launch --multi_gpu``, torchrun:
    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); NCCL on GPUs, gloo on CPUs; one process otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, timeout=STAGE_TIMEOUT)
    return Processes(torch.distributed.get_rank(), torch.distributed.get_world_size())
