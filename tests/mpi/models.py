"""Tiny models and data shared by the SPMD tests; every rank builds them from the same seed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hvdhybrid.parallel.graph import StageGraph
from hvdhybrid.parallel.staged import StagedModel, split_sequential
from hvdhybrid.training.data import TensorDataset


def data(rows: int = 288, features: int = 16, classes: int = 5, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    y = torch.randint(0, classes, (rows,), generator=g)
    return TensorDataset(x, y)


def plain_loop(m: nn.Module, ds: Any, o: torch.optim.Optimizer, loss_fn: Any, steps: int, batch: int,
               clip: float = 0.0) -> None:
    """The one-process reference: the sampler's global batches, step and rows set by hand (keyed
    draws), one backward per step, optional clipping."""
    from hvdhybrid.parallel import randomness
    from hvdhybrid.training.data import Sampler

    m.train()
    sampler = Sampler(len(ds), batch, seed=0)
    for step in range(1, steps + 1):
        idx = sampler.next()
        randomness.set_step(0, step)
        randomness.set_rows(idx)
        x, y = ds.batch(idx)
        o.zero_grad()
        loss_fn(m(x), y).backward()
        if clip:
            nn.utils.clip_grad_norm_(m.parameters(), clip)
        o.step()


def byte_windows(seq: int, rows: int = 32) -> Any:
    """``rows`` random byte sequences of ``seq`` tokens with next-byte targets (the language-model tests)."""
    from hvdhybrid.training.data import TensorDataset

    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 256, (rows, seq + 1), generator=g)
    return TensorDataset(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())


def mlp_layers(seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(16, 32), nn.Tanh()), nn.Sequential(nn.Linear(32, 32), nn.Tanh()),
            nn.Sequential(nn.Linear(32, 24), nn.Tanh()), nn.Linear(24, 5)]


def chain(num_stages: int, seed: int = 0) -> StagedModel:
    layers = mlp_layers(seed)
    q, r = divmod(len(layers), num_stages)
    sizes = [q + (1 if i < r else 0) for i in range(num_stages)]
    return split_sequential(layers, sizes, nn.functional.cross_entropy)


def chain_reference(seed: int = 0) -> nn.Module:
    return nn.Sequential(*mlp_layers(seed))


class Encoder(nn.Module):
    def __init__(self, act: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.act = act

    def forward(self, x: torch.Tensor) -> Any:
        h = self.lin(x)
        # a tuple with an integer tensor: only float tensors carry gradients back
        return (torch.tanh(h) if self.act else h, (x > 0).sum(1))


class Join(nn.Module):
    def __init__(self, n_in: int, takes_batch: bool) -> None:
        super().__init__()
        self.takes_batch = takes_batch
        self.lin = nn.Linear(12 * n_in + (16 if takes_batch else 0), 5)

    def forward(self, *args: Any) -> torch.Tensor:
        parts = []
        for a in args:
            if isinstance(a, tuple):  # an encoder's (features, counts)
                parts.append(a[0] * (1 + 0.01 * a[1].unsqueeze(1).float()))
            else:
                parts.append(a)
        return self.lin(torch.cat(parts, 1))


def fork_join(seed: int = 0) -> StagedModel:
    """Two encoders on stages 0 and 1 (side by side), joined on stage 2."""
    torch.manual_seed(seed)
    stages: list[nn.Module] = [Encoder(True), Encoder(False), Join(2, False)]
    return StagedModel(StageGraph(3, ((0, 2), (1, 2))), stages, nn.functional.cross_entropy,
                       ['enc0.', 'enc1.', 'join.'])


def task_pair(seed: int = 0) -> StagedModel:
    """GROVER's shape on two ranks: stage 0 encodes, stage 1 encodes too and joins."""
    torch.manual_seed(seed)
    stages: list[nn.Module] = [Encoder(True), Join(1, True)]
    return StagedModel(StageGraph(2, ((0, 1),), frozenset({0, 1})), stages,
                       nn.functional.cross_entropy, ['enc0.', 'join.'])


# -- a tied weight: the first and the last stage share one parameter --------------------------
class TiedIn(nn.Module):
    """Stage 0: x -> tanh(x W^T), W [8, 16] (the 'embedding')."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w.t())


class TiedOut(nn.Module):
    """Last stage: h -> head(tanh(h W)) with the same W (the 'output layer')."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16) * 0.3)
        self.head = nn.Linear(16, 5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(h @ self.w))


def tied_chain(num_stages: int, seed: int = 0) -> StagedModel:
    """``num_stages`` >= 2 stages, each built alone (keyed); stage 0's ``w`` is the last stage's."""
    from hvdhybrid.parallel.ownership import Tie
    from hvdhybrid.parallel.staged import keyed

    k = num_stages

    def make(s: int) -> nn.Module:
        if s == 0:
            return TiedIn()
        if s == k - 1:
            return TiedOut()
        return nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    prefixes = [f"s{s}." for s in range(k)]
    return StagedModel(StageGraph.chain(k), None, nn.functional.cross_entropy, prefixes,
                       builder=lambda s: keyed(seed, s, lambda: make(s)),
                       ties=(Tie({0: "s0.w", k - 1: f"s{k - 1}.w"}),))


# -- a column-parallel linear layer over the tensor group (a test of the Sharded tag) -----------
class _GatherColumns(torch.autograd.Function):
    """Forward: all-gather the tensor ranks' output columns; backward: keep this rank's columns."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, comm: Any) -> torch.Tensor:  # type: ignore[override]
        size, rank = comm.Get_size(), comm.Get_rank()
        ctx.rank, ctx.cols = rank, y.shape[1]
        parts = torch.empty((size,) + tuple(y.shape), dtype=y.dtype)
        comm.Allgather(y.detach().contiguous().numpy(), parts.numpy())
        return torch.cat(list(parts), 1)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        return g[:, ctx.rank * ctx.cols:(ctx.rank + 1) * ctx.cols].contiguous(), None


class ColumnLinear(nn.Module):
    """``nn.Linear(fin, fout)`` with its output features split over ``comm`` (rows of the weight)."""

    def __init__(self, full: nn.Linear, comm: Any) -> None:
        super().__init__()
        from hvdhybrid.parallel.ownership import Sharded, tag

        size, rank = comm.Get_size(), comm.Get_rank()
        n = full.out_features // size
        self.comm = comm
        self.weight = nn.Parameter(full.weight.detach()[rank * n:(rank + 1) * n].clone())
        self.bias = nn.Parameter(full.bias.detach()[rank * n:(rank + 1) * n].clone())
        tag(self.weight, Sharded(0, size, rank))
        tag(self.bias, Sharded(0, size, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from hvdhybrid.parallel.tensor_parallel import copy_to

        x = copy_to(x, self.comm)
        return _GatherColumns.apply(x @ self.weight.t() + self.bias, self.comm)


def tensor_chain(num_stages: int, tensor_comm: Any, seed: int = 0) -> StagedModel:
    """mlp_layers keyed, with every 32-wide Linear split column-wise over ``tensor_comm``."""
    from hvdhybrid.parallel.staged import keyed

    fns = mlp_layer_fns()
    q, r = divmod(len(fns), num_stages)
    sizes = [q + (1 if i < r else 0) for i in range(num_stages)]
    firsts = [sum(sizes[:s]) for s in range(num_stages)]

    def layer(i: int) -> nn.Module:
        m = keyed(seed, i, fns[i])
        lin = m[0] if isinstance(m, nn.Sequential) else m
        if isinstance(lin, nn.Linear) and lin.out_features == 32:
            m[0] = ColumnLinear(lin, tensor_comm)  # type: ignore[index]
        return m

    from hvdhybrid.parallel.staged import Part

    return StagedModel(StageGraph.chain(num_stages), None, nn.functional.cross_entropy,
                       builder=lambda s: Part([layer(i) for i in range(firsts[s], firsts[s] + sizes[s])],
                                              firsts[s]))


def mlp_layer_fns() -> list[Any]:
    """The layers of mlp_layers as factories (for keyed, per-stage builds)."""
    return [lambda: nn.Sequential(nn.Linear(16, 32), nn.Tanh()),
            lambda: nn.Sequential(nn.Linear(32, 32), nn.Tanh()),
            lambda: nn.Sequential(nn.Linear(32, 24), nn.Tanh()),
            lambda: nn.Linear(24, 5)]


def keyed_chain(num_stages: int, seed: int = 0) -> StagedModel:
    """The same layers as :func:`chain`'s, each built alone (keyed): a rank builds only its stages."""
    from hvdhybrid.parallel.staged import sequential_model

    fns = mlp_layer_fns()
    q, r = divmod(len(fns), num_stages)
    return sequential_model(fns, [q + (1 if i < r else 0) for i in range(num_stages)],
                            nn.functional.cross_entropy, seed)


def keyed_reference(seed: int = 0) -> nn.Module:
    from hvdhybrid.parallel.staged import keyed_layers

    return nn.Sequential(*keyed_layers(mlp_layer_fns(), seed))
