"""The quick default ResNet: basic blocks at ``--width`` channels, sized for small images.

GroupNorm instead of BatchNorm by default: batch statistics would depend on how
a batch is cut into microbatches and replicas, and the runtime promises that no
layout changes the result (``norm="batch"`` trades that promise for BatchNorm).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["NORMS", "BasicBlock", "norm_layer", "resnet_layers", "resnet_layer_fns"]

#: ``group``: GroupNorm (layout-transparent); ``batch``: BatchNorm with statistics per microbatch
NORMS = ("group", "batch")


def norm_layer(norm: str, channels: int, groups: int = 8) -> nn.Module:
    """GroupNorm with up to ``groups`` groups, or BatchNorm (``norm="batch"``)."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm != "group":
        raise ValueError(f"norm {norm!r} is unknown; choose one of {', '.join(NORMS)}")
    return nn.GroupNorm(min(groups, channels), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (projected when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, norm: str = "group") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = norm_layer(norm, cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.n1(self.conv1(x)))
        return torch.relu(self.n2(self.conv2(y)) + self.short(x))


def resnet_layer_fns(in_channels: int, num_classes: int, width: int = 16, blocks: tuple[int, ...] = (2, 2, 2),
                     norm: str = "group") -> list[Callable[[], nn.Module]]:
    """Factories of the stem, residual blocks (width doubling, stride 2 between groups), pooled head.

    Factories, not modules, so that a rank builds only the layers of its own
    stages (:func:`hvdhybrid.parallel.staged.sequential_model`).
    """
    def stem() -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), norm_layer(norm, width),
                             nn.ReLU())

    def block(cin: int, cout: int, stride: int) -> Callable[[], nn.Module]:
        return lambda: BasicBlock(cin, cout, stride, norm)

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
                  blocks: tuple[int, ...] = (2, 2, 2), norm: str = "group") -> list[nn.Module]:
    """The layers of :func:`resnet_layer_fns`, built in order under the current RNG."""
    return [f() for f in resnet_layer_fns(in_channels, num_classes, width, blocks, norm)]
