"""A small ResNet for image classification, as a sequence of layers to cut into stages.

GroupNorm instead of BatchNorm: batch statistics would depend on how a batch
is cut into microbatches and replicas, and the runtime promises that no layout
changes the result.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["BasicBlock", "resnet_layers", "resnet_layer_fns"]


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (projected when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.n1(self.conv1(x)))
        return torch.relu(self.n2(self.conv2(y)) + self.short(x))


def resnet_layer_fns(in_channels: int, num_classes: int, width: int = 16,
                     blocks: tuple[int, ...] = (2, 2, 2)) -> list[Callable[[], nn.Module]]:
    """Factories of the stem, residual blocks (width doubling, stride 2 between groups), pooled head.

    Factories, not modules, so that a rank builds only the layers of its own
    stages (:func:`hvdhybrid.parallel.staged.sequential_model`).
    """
    def stem() -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), _norm(width), nn.ReLU())

    def block(cin: int, cout: int, stride: int) -> Callable[[], nn.Module]:
        return lambda: BasicBlock(cin, cout, stride)

    def head(c: int) -> Callable[[], nn.Module]:
        return lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    fns: list[Callable[[], nn.Module]] = [stem]
    c = width
    for g, n in enumerate(blocks):
        cout = width * (2 ** g)
        for b in range(n):
            fns.append(block(c, cout, 2 if (b == 0 and g > 0) else 1))
            c = cout
    return fns + [head(c)]


def resnet_layers(in_channels: int, num_classes: int, width: int = 16,
                  blocks: tuple[int, ...] = (2, 2, 2)) -> list[nn.Module]:
    """The layers of :func:`resnet_layer_fns`, built in order under the current RNG."""
    return [f() for f in resnet_layer_fns(in_channels, num_classes, width, blocks)]
