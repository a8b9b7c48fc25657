"""ResNet-18/34/50/101/152 (He et al. 2016; torchvision's v1.5: stride on the 3x3 of a bottleneck).

Module and parameter names are torchvision's (``conv1.weight``, ``bn1.running_var``,
``layer3.5.bn3.weight``, ``layer1.0.downsample.1.bias``, ``fc.weight``), so a
torchvision-format state dict loads by name into any layout. The model is six
units, the chain ``--partition`` cuts: the stem (conv1, bn1, relu, maxpool),
layer1 .. layer4, and the head (avgpool, fc). Each unit is a
:class:`~hvdhybrid.parallel.staged.Unit`: its children sit at the top of the
stage module, as they sit at the top of torchvision's ``ResNet``.

The normalisation layers keep the name ``bn*`` whichever ``norm`` is chosen:
GroupNorm (32 groups, the default) has a weight and a bias under those names,
and BatchNorm adds its running statistics.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from ...parallel.staged import Unit
from .small import norm_layer

__all__ = ["ARCHS", "BasicBlock", "Bottleneck", "torchvision_layer_fns"]

GROUPS = 32  # GroupNorm groups (Wu & He 2018); every channel count here is a multiple of 64


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convolutions, expansion 1."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: Optional[nn.Module],
                 norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm, planes, GROUPS)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm, planes, GROUPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1, 3x3 (with the stride), 1x1 to 4x the planes."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, downsample: Optional[nn.Module],
                 norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = norm_layer(norm, planes, GROUPS)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(norm, planes, GROUPS)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm_layer(norm, planes * 4, GROUPS)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


Block = Union[type[BasicBlock], type[Bottleneck]]

#: name -> (block, blocks per layer), as torchvision defines them
ARCHS: dict[str, tuple[Block, tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def _init(module: nn.Module) -> nn.Module:
    """torchvision's initialisation with ``zero_init_residual=True``: He-normal (fan out) convolutions,
    norms at weight 1 and bias 0, but the last norm of each residual branch at weight 0, so every
    block starts as the identity (Goyal et al. 2017; the GroupNorm paper's choice). Without it a deep
    ResNet's first steps diverge at the learning rates that train it."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)  # type: ignore[arg-type]
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)  # type: ignore[arg-type]
    return module


class Stem(Unit):
    def __init__(self, in_channels: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(norm, 64, GROUPS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return out


class Layer(Unit):
    """``layer{index}``: an nn.Sequential of blocks, the first with the stride and the projection."""

    def __init__(self, index: int, block: Block, cin: int, planes: int, blocks: int, stride: int,
                 norm: str) -> None:
        super().__init__()
        out = planes * block.expansion
        down = None
        if stride != 1 or cin != out:
            down = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), norm_layer(norm, out, GROUPS))
        layers = [block(cin, planes, stride, down, norm)]
        layers += [block(out, planes, 1, None, norm) for _ in range(1, blocks)]
        self.name = f"layer{index}"
        self.add_module(self.name, nn.Sequential(*layers))
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.get_submodule(self.name)(x)
        return out


class Head(Unit):
    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return out


def torchvision_layer_fns(arch: str, in_channels: int = 3, num_classes: int = 1000,
                          norm: str = "group") -> list[Callable[[], nn.Module]]:
    """Factories of the six units of ``arch`` (stem, layer1..layer4, head): a rank builds only its own.

    Raises:
        ValueError: an unknown ``arch`` (the CLI offers only :data:`ARCHS`).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown ResNet {arch!r}; choose one of {', '.join(ARCHS)}")
    block, counts = ARCHS[arch]
    def layer(i: int, cin: int, planes: int, n: int) -> Callable[[], nn.Module]:
        return lambda: Layer(i + 1, block, cin, planes, n, 1 if i == 0 else 2, norm)

    fns: list[Callable[[], nn.Module]] = [lambda: Stem(in_channels, norm)]
    cin = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), counts)):
        fns.append(layer(i, cin, planes, n))
        cin = planes * block.expansion
    features = cin
    fns.append(lambda: Head(features, num_classes))
    return fns
