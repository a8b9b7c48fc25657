"""Point-to-point between two ranks of a bundle: tuples, dtypes, grads, changing shapes, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hvdhybrid.comm.p2p import P2P, MsgKey
from hvdhybrid.layout.placement import Placement
from hvdhybrid.layout.topology import Layout
from hvdhybrid.parallel.graph import StageGraph
from hvdhybrid.pipeline.executor import Executor, StageShapeError
from hvdhybrid.pipeline.schedules import forward_only


def need(world: Any, n: int) -> None:
    if world.Get_size() < n:
        pytest.skip(f"needs {n} ranks")


def test_tuples_of_any_dtype_with_changing_shapes(world: Any) -> None:
    need(world, 2)
    comm = world.Split(0 if world.Get_rank() < 2 else 1, world.Get_rank())
    if world.Get_rank() < 2:
        p2p = P2P(comm, 1, torch.device("cpu"))
        rank = comm.Get_rank()
        for mb, rows in enumerate([3, 7, 0, 5]):  # a new shape every microbatch, one empty
            key = MsgKey(0, mb, 0, 0, 1)
            g = torch.Generator().manual_seed(mb)
            msg = (torch.randn(rows, 4, generator=g).requires_grad_(),
                   torch.arange(rows, dtype=torch.int64),
                   None,
                   torch.randn(2, rows, generator=g).to(torch.bfloat16),
                   torch.randn(rows, 3, generator=g).t(),  # non-contiguous: staged through a copy
                   torch.tensor(True))
            if rank == 0:
                p2p.send(1, key, msg)
                p2p.wait_sends()
            else:
                got = p2p.recv(0, key).wait()
                assert len(got) == len(msg)
                for a, b in zip(got, msg):
                    if b is None:
                        assert a is None
                        continue
                    assert a is not None and a.dtype == b.dtype and a.shape == b.shape
                    assert torch.equal(a, b.detach())
                    assert a.requires_grad == b.requires_grad
    comm.Free()


def test_a_slot_reused_with_changing_shapes_and_a_sender_running_ahead(world: Any) -> None:
    """The same key message after message (as evaluation batches send it, with no barrier between):
    shapes that stay, grow, shrink, go empty and come back all arrive whole, even when the sender has
    sent every message before the receiver looks at the first."""
    need(world, 2)
    comm = world.Split(0 if world.Get_rank() < 2 else 1, world.Get_rank())
    if world.Get_rank() < 2:
        p2p = P2P(comm, 1, torch.device("cpu"))
        key = MsgKey(0, 0, 0, 0, 1)
        rows = [4, 4, 9, 9, 2, 0, 2, 2]
        msgs = [(torch.full((n, 3), float(i)), torch.arange(n * 2, dtype=torch.int64))
                for i, n in enumerate(rows)]
        if comm.Get_rank() == 0:
            for msg in msgs:
                p2p.send(1, key, msg)
            p2p.wait_sends()
        else:
            for i, msg in enumerate(msgs):
                got = p2p.recv(0, key).wait()
                assert all(torch.equal(a, b) for a, b in zip(got, msg)), (i, got)
    comm.Free()


def test_receiver_names_stages_microbatch_and_shapes_instead_of_hanging(world: Any) -> None:
    """Two front replicas send rows of different widths; the rear cannot join them."""
    need(world, 3)
    color = 0 if world.Get_rank() < 3 else 1
    comm = world.Split(color, world.Get_rank())
    if color == 0:
        layout = Layout(3, (2, 1))
        c = layout.coord(comm.Get_rank())
        graph = StageGraph.chain(2)
        feat = 4 + c.replica  # replica 1 sends one feature more: a bug the rear must report

        class Front(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.ones(x.shape[0], feat)

        module = Front() if c.stage == 0 else torch.nn.Identity()
        ex = Executor(graph, layout, Placement.identity(2), c, {c.stage: module},
                      P2P(comm, 1, torch.device("cpu")))

        def batch(mb: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.zeros(2, 3), torch.zeros(2)

        if c.stage == 0:
            ex.run(forward_only(graph, 0, 1), batch, 1, train=False)
        else:
            with pytest.raises(StageShapeError) as e:
                ex.run(forward_only(graph, 1, 1), batch, 1, train=False)
            msg = str(e.value)
            assert "stage 1" in msg and "stage 0" in msg and "microbatch 0" in msg
            assert "(2, 4)" in msg and "(2, 5)" in msg
    comm.Free()
