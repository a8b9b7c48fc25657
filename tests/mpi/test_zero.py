"""ZeroOptimizer on the data group: a share stepped alone is the whole step; every member's share
file joins by name into whole per-parameter state, which cuts back to the share; optimizers that are
not elementwise are refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from hvdhybrid.comm.groups import ProcessGroups
from hvdhybrid.layout.topology import Layout
from hvdhybrid.training.checkpoint import Manifest
from hvdhybrid.training.state import CheckpointReader, NamedState
from hvdhybrid.training.zero import ZeroError, ZeroOptimizer


def _params() -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(n, generator=g)) for n in (7, 30, 1, 13)]  # 51: not a multiple of 2, 4


def _grads(step: int, rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(n, generator=g) for n in (7, 30, 1, 13)]


def _adamw(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=0.1, weight_decay=0.01)


@pytest.mark.parametrize("level", [1, 2])
def test_a_sharded_step_is_the_whole_step_and_its_state_round_trips(world: Any, level: int) -> None:
    if world.Get_size() < 2:
        pytest.skip("needs 2 bundles")
    d = world.Get_size()
    groups = ProcessGroups.create(Layout(d, (1,)), world)
    try:
        ref_params = _params()
        ref = _adamw(ref_params)
        mine = _params()
        zero = ZeroOptimizer(mine, _adamw, groups.data, level)
        assert zero.n * d >= 51 and zero.n == -(-51 // d)
        for step in range(3):
            every = [_grads(step, r) for r in range(d)]  # the average the data group computes
            for i, p in enumerate(ref_params):
                p.grad = sum(e[i] for e in every) / d
            ref.step()
            for p, gr in zip(mine, _grads(step, world.Get_rank())):
                p.grad = gr.clone()
            if level == 2:
                zero.reduce_rest()
                assert all(p.grad is None for p in mine) and zero.part.grad.numel() == zero.n
            else:  # level 1: the sync averaged them whole already
                for i, p in enumerate(mine):
                    p.grad = sum(e[i] for e in every) / d
            zero.step()
            zero.zero_grad()
            for a, b in zip(ref_params, mine):
                assert torch.allclose(a, b, atol=1e-6), (step, float((a - b).abs().max()))
        # every member's share file, joined by name, is each parameter's whole state
        named = NamedState({0: {f"p{i}": q for i, q in enumerate(mine)}}, {0: {}}, zero)  # type: ignore[arg-type]
        fname = f"zero-b{groups.data.Get_rank()}.pt"
        files = groups.data.allgather((fname, *named.share_file(zero, fname)))
        optim: dict[str, list[dict[str, Any]]] = {}
        for _, _, pieces in files:
            for n, ps in pieces.items():
                optim.setdefault(n, []).extend(ps)
        reader = CheckpointReader("(memory)", Manifest(3, "test", d, (1,), {}, optim=optim))
        reader._cache = {f: content for f, content, _ in files}
        for i, p in enumerate(ref_params):
            got = reader.optimizer(f"p{i}")
            assert float(got["step"]) == float(ref.state[p]["step"])
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.allclose(ref.state[p][k], got[k], atol=1e-6), (i, k)
        whole = {q: {k: ref.state[p][k].clone() for k in ref.state[p]} for p, q in zip(ref_params, mine)}
        before = {k: v.clone() for k, v in zero.inner.state[zero.part].items() if torch.is_tensor(v)}
        zero.state = whole
        zero.absorb_loaded_state()
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(zero.inner.state[zero.part][k], before[k], atol=1e-6)
    finally:
        groups.close()


def test_an_optimizer_that_is_not_elementwise_is_refused_by_name(world: Any) -> None:
    with pytest.raises(ZeroError, match="LBFGS is not known to step elementwise"):
        ZeroOptimizer(_params(), lambda ps: torch.optim.LBFGS(ps), world, 1)


@pytest.mark.parametrize("fp16", [False, True])
def test_level_2_sends_chunks_during_the_backward_and_frees_them(world: Any, fp16: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two local stages sharing a weight (a tie on one rank): stage 1's last backward sends its chunks
    (the end of the buffer) and frees its whole gradients before stage 0's backward runs; after the
    sync each member's share is the data group's average (float16 on the wire: within its rounding)."""
    from mpi4py import MPI

    import hvdhybrid.training.zero as zmod

    if world.Get_size() < 2:
        pytest.skip("needs 2 bundles")
    monkeypatch.setattr(zmod, "CHUNK", 5)  # many chunks, some straddling parameters
    d, r = world.Get_size(), world.Get_rank()
    groups = ProcessGroups.create(Layout(d, (1,)), world)

    def build() -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Parameter]:
        torch.manual_seed(0)
        return nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3), nn.Parameter(torch.tensor(0.5))

    def backward(a: nn.Linear, b: nn.Linear, c: nn.Linear, tie: nn.Parameter, zero: Any, watch: Any) -> None:
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(r))
        h = b(torch.tanh(a(x)) * tie)
        leaf = h.detach().requires_grad_()
        loss = (c(leaf) * tie).square().sum()
        if zero:
            watch.final_begin(1)
        loss.backward()
        if zero:
            watch.final_end(1)
            assert c.bias.grad is None  # its chunk (the last) was sent and freed in stage 1's backward
            assert 0 < zero._round.next < len(zero._chunks)  # stage 0's chunks wait for its backward
            watch.final_begin(0)
        h.backward(leaf.grad)
        if zero:
            watch.final_end(0)

    try:
        a, b, c, tie = build()
        ref = [tie, *a.parameters(), *b.parameters(), *c.parameters()]
        backward(a, b, c, tie, None, None)
        want = torch.cat([p.grad.reshape(-1) for p in ref])
        world.Allreduce(MPI.IN_PLACE, want.numpy(), op=MPI.SUM)
        want /= d
        a, b, c, tie = build()
        mine = [tie, *a.parameters(), *b.parameters(), *c.parameters()]
        zero = ZeroOptimizer(mine, lambda ps: torch.optim.SGD(ps, lr=0.1), groups.data, 2, fp16=fp16)
        watch = zero.watch({0: [tie, *a.parameters(), *b.parameters()], 1: [tie, *c.parameters()]})
        backward(a, b, c, tie, zero, watch)
        zero.reduce_rest()
        assert all(p.grad is None for p in mine)
        share = zero.part.grad
        lo = zero.lo
        expect = torch.cat([want, torch.zeros(zero.n * d - want.numel())])[lo:lo + zero.n]
        tol = 2e-3 * float(want.abs().max()) if fp16 else 1e-6
        assert float((share - expect).abs().max()) <= tol
        assert float(expect.abs().max()) > 0
    finally:
        groups.close()


def test_level_2_every_action_sends_all_and_the_owners_add_the_rounds_up(
        world: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--reduce microbatch``: a round per weight-gradient action. Two local stages sharing a weight,
    two microbatches each, their backwards interleaved as 1F1B runs them: after every action no whole
    gradient is left, and after the sync each member's share is the average of the sum of all four."""
    from mpi4py import MPI

    import hvdhybrid.training.zero as zmod

    if world.Get_size() < 2:
        pytest.skip("needs 2 bundles")
    monkeypatch.setattr(zmod, "CHUNK", 5)
    d, r = world.Get_size(), world.Get_rank()
    groups = ProcessGroups.create(Layout(d, (1,)), world)

    def build() -> tuple[nn.Linear, nn.Linear, nn.Parameter]:
        torch.manual_seed(0)
        return nn.Linear(4, 4), nn.Linear(4, 3), nn.Parameter(torch.tensor(0.5))

    def run(a: nn.Linear, c: nn.Linear, tie: nn.Parameter, watch: Any) -> list[nn.Parameter]:
        mine = [tie, *a.parameters(), *c.parameters()]
        held = []
        for mb in range(2):
            x = torch.randn(6, 4, generator=torch.Generator().manual_seed(10 * r + mb))
            h = torch.tanh(a(x)) * tie
            leaf = h.detach().requires_grad_()
            loss = (c(leaf) * tie).square().sum()
            for stage in (1, 0):
                if watch:
                    watch.final_begin(stage)
                if stage == 1:
                    loss.backward()
                else:
                    h.backward(leaf.grad)
                if watch:
                    watch.final_end(stage)
                    held.append(sum(p.grad is not None for p in mine))
        assert not watch or held == [0, 0, 0, 0]
        return mine

    try:
        a, c, tie = build()
        ref = run(a, c, tie, None)
        want = torch.cat([p.grad.reshape(-1) for p in ref])
        world.Allreduce(MPI.IN_PLACE, want.numpy(), op=MPI.SUM)
        want /= d
        a, c, tie = build()
        zero = ZeroOptimizer([tie, *a.parameters(), *c.parameters()], lambda ps: torch.optim.SGD(ps, lr=0.1),
                             groups.data, 2)
        watch = zero.watch({0: [tie, *a.parameters()], 1: [tie, *c.parameters()]}, every=True)
        run(a, c, tie, watch)
        zero.reduce_rest()
        expect = torch.cat([want, torch.zeros(zero.n * d - want.numel())])[zero.lo:zero.lo + zero.n]
        assert float((zero.part.grad - expect).abs().max()) <= 1e-6 * float(want.abs().max())
        assert float(expect.abs().max()) > 0
        zero.zero_grad()
        zero.reduce_rest()  # a step whose actions sent nothing: a zero share, and nothing sent twice
        assert float(zero.part.grad.abs().max()) == 0.0
    finally:
        groups.close()
