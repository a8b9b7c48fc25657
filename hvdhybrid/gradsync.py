"""Gradient synchronisation: average within the stage group, then across bundles with Horovod."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .groups import ProcessGroups

__all__ = ["GradSync"]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def _unflat(flat: torch.Tensor, like: list[torch.Tensor]) -> None:
    off = 0
    for t in like:
        n = t.numel()
        t.copy_(flat[off:off + n].view_as(t))
        off += n


class GradSync:
    """Averages one stage's gradients over its replicas and over bundles.

    Called once per optimizer step (after all microbatches and accumulation
    steps), never per microbatch.

    Args:
        groups: this rank's process groups.
        module: the stage's module (its parameters are synchronised).
        fp16: send gradients across bundles as float16 (Horovod ``Compression.fp16``).
    """

    def __init__(self, groups: ProcessGroups, module: nn.Module, fp16: bool = True) -> None:
        self.groups, self.fp16 = groups, fp16
        self.params = [p for p in module.parameters() if p.requires_grad]

    def _grads(self) -> list[torch.Tensor]:
        for p in self.params:
            if p.grad is None:  # a parameter this rank's rows never touched still takes part
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params if p.grad is not None]

    def sync(self) -> None:
        """Average every gradient over the stage group, then over the data group."""
        if not self.params:
            return
        grads = self._grads()
        width = self.groups.stage.Get_size()
        if width > 1:
            from mpi4py import MPI

            flat = _flat(grads).to(torch.float64 if grads[0].dtype == torch.float64 else torch.float32)
            arr = flat.cpu().numpy()
            self.groups.stage.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
            _unflat(torch.from_numpy(arr).to(grads[0].device).div_(width), grads)
        if self.groups.data_set is not None:
            from . import hvd

            c = self.groups.coord
            reduced = hvd.allreduce_average(grads, self.groups.data_set, self.fp16,
                                            name=f"grads.s{c.stage}.r{c.replica}")
            for g, r in zip(grads, reduced):
                g.copy_(r)

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Make every replica of this stage start from bundle 0, replica 0's parameters."""
        tensors = [t for t in list(module.parameters()) + list(module.buffers())]
        if self.groups.stage.Get_size() > 1:
            for t in tensors:
                arr = t.detach().cpu().contiguous()
                self.groups.stage.Bcast(_np(arr), root=0)
                t.data.copy_(arr)
        if self.groups.data_set is not None:
            from . import hvd

            root = self.groups.layout.rank_of(0, self.groups.coord.stage, self.groups.coord.replica)
            c = self.groups.coord
            hvd.broadcast_([t.data for t in tensors], root, self.groups.data_set,
                           name=f"params.s{c.stage}.r{c.replica}")


def _np(t: torch.Tensor) -> Any:
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else t.numpy()
