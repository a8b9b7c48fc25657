"""OverlapReduce (--reduce overlap): each bucket's average across bundles starts as soon as its gradients
are final, during the backward, and the result is the average the reduce after the schedule gives."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from mpi4py import MPI
from torch import nn

from hvdhybrid.comm.groups import ProcessGroups
from hvdhybrid.layout.topology import Layout
from hvdhybrid.training.overlap import OverlapReduce


@pytest.mark.parametrize("fp16", [False, True])
def test_buckets_start_in_the_backward_and_average_as_after(world: Any, fp16: bool) -> None:
    if world.Get_size() < 2:
        pytest.skip("needs 2 bundles")
    d, r = world.Get_size(), world.Get_rank()
    groups = ProcessGroups.create(Layout(d, (1,)), world)
    try:
        torch.manual_seed(0)
        a, b = nn.Linear(64, 64), nn.Linear(64, 8)  # stage 0 and stage 1 of this rank
        ps = [*a.parameters(), *b.parameters()]
        # buckets of b's size, from the last parameter back: b; a's bias; a's weight
        over = OverlapReduce(ps, {0: list(a.parameters()), 1: list(b.parameters())}, groups.data_set,
                             f"t.overlap.{fp16}", fp16, bucket_mb=520 * 4 / 2**20)
        assert [sorted(idx) for idx in over.buckets] == [[2, 3], [1], [0]]
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(r))
        h = a(x)
        leaf = h.detach().requires_grad_()
        loss = b(leaf).square().sum()
        over.watch.final_begin(1)
        loss.backward()
        over.watch.final_end(1)
        assert over.handles[0] is not None and over.handles[1:] == [None, None]  # b's went; a's wait
        over.watch.final_begin(0)
        h.backward(leaf.grad)
        assert all(h is not None for h in over.handles)  # started from the hooks, inside the backward
        over.watch.final_end(0)
        want = [p.grad.clone() for p in ps]
        for w in want:
            world.Allreduce(MPI.IN_PLACE, w.numpy(), op=MPI.SUM)
            w /= d
        over.finish()
        tol = 2e-3 if fp16 else 1e-6
        for p, w in zip(ps, want):
            assert float((p.grad - w).abs().max()) <= tol * max(1.0, float(w.abs().max()))
        assert over.handles == [None] * 3 and not over.watch.active  # ready for the next step
    finally:
        groups.close()
