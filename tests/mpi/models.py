"""Tiny models and data shared by the SPMD tests; every rank builds them from the same seed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hvdhybrid.data import TensorDataset
from hvdhybrid.graph import StageGraph
from hvdhybrid.staged import StagedModel, split_sequential


def data(rows: int = 288, features: int = 16, classes: int = 5, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    y = torch.randint(0, classes, (rows,), generator=g)
    return TensorDataset(x, y)


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
