"""``--reduce overlap``: gradients averaged across bundles while the backward goes on.

Without it the data-group all-reduce starts when the rank's whole schedule is
done. With it, this rank's gradients are cut into buckets of whole tensors
(about ``bucket_mb``, from the last parameter back: the order a backward
finishes them in), and each bucket's average starts on Horovod's background
thread as soon as every gradient in it is final
(:class:`~hvdhybrid.training.final_grads.FinalGrads`): during the stage's last
backward of the step, bucket by bucket, and, with several stages per rank,
while the rank's other stages still run. The sync then only waits. The same
averages as after the schedule: fp16 buckets are cast and averaged as
:class:`~hvdhybrid.comm.fp16_allreduce.Fp16Allreduce` does, fp32 ones by a
grouped all-reduce (Horovod's ``op=Average`` either way).

It needs each gradient to be final on this rank when its stage's last backward
ends: not so with row replicas (their gradients are averaged over the row group
first) or ties across ranks (summed first), nor with ``--zero 2`` (which sends
chunks to their owners instead); there the reduce runs after the schedule.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..comm import horovod_ops
from ..comm.fp16_allreduce import Fp16Allreduce
from .final_grads import FinalGrads

__all__ = ["OverlapReduce"]


class OverlapReduce:
    """Averages ``params``' gradients over ``process_set`` bucket by bucket as they become final.

    Args:
        params: this rank's parameters (every member of the data group lists the same ones, in order).
        stages: this rank's stage -> the parameters it uses.
        process_set: the data group's Horovod process set.
        name: a name unique to this data group's gradients and the same every step.
        fp16: send the buckets as float16.
        bucket_mb: megabytes of fp32 gradients per bucket (whole tensors).
    """

    def __init__(self, params: Sequence[nn.Parameter], stages: dict[int, Sequence[nn.Parameter]],
                 process_set: Any, name: str, fp16: bool, bucket_mb: float = 8.0) -> None:
        self.params, self.process_set, self.name, self.fp16 = list(params), process_set, name, fp16
        limit = max(1, int(bucket_mb * 2**20 / 4))
        self.buckets: list[list[int]] = []
        size = 0
        for i in reversed(range(len(self.params))):
            n = self.params[i].numel()
            if not self.buckets or size + n > limit:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(i)
            size += n
        self.bucket_of = {i: b for b, idx in enumerate(self.buckets) for i in idx}
        self._fp16 = [Fp16Allreduce(process_set, f"{name}.o{b}", bucket_mb=1e6) for b in
                      range(len(self.buckets))] if fp16 else []
        self.waiting: list[int] = []
        self.handles: list[Optional[Any]] = []
        self.watch = FinalGrads(self.params, stages, on_final=self._final, on_begin=self._begin)
        self._begin()
        self.watch.reset()

    def _begin(self) -> None:
        self.waiting = [len(idx) for idx in self.buckets]
        self.handles = [None] * len(self.buckets)

    def _final(self, i: int) -> None:
        b = self.bucket_of[i]
        self.waiting[b] -= 1
        if self.waiting[b] == 0:
            self._start(b)

    def _start(self, b: int) -> None:
        grads = []
        for i in self.buckets[b]:
            p = self.params[i]
            if p.grad is None:  # a parameter this step never touched still takes part
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        if self.fp16:
            self.handles[b] = self._fp16[b].start(grads)
        else:
            self.handles[b] = horovod_ops.grouped_average_async_(grads, self.process_set, f"{self.name}.o{b}")

    def finish(self) -> None:
        """At the sync: start what the backward did not (every gradient is final now), then wait for
        every bucket; the gradients then hold the data group's average."""
        for b in range(len(self.buckets)):
            if self.handles[b] is None:
                self._start(b)
        for b, h in enumerate(self.handles):
            if self.fp16:
                self._fp16[b].finish(h or [])
            else:
                horovod_ops.synchronize(h)
        self._begin()
        self.watch.reset()
