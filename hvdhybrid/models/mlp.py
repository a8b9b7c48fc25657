"""A plain multilayer perceptron as a sequence of layers (benchmarks, fast tests)."""

from __future__ import annotations

from torch import nn

__all__ = ["mlp_layers"]


def mlp_layers(in_features: int, hidden: int, depth: int, out_features: int) -> list[nn.Module]:
    """``depth`` layers: (Linear+ReLU) x (depth-1), then a Linear head; flattens its input."""
    layers: list[nn.Module] = []
    d = in_features
    for i in range(depth - 1):
        layers.append(nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU()) if i == 0
                      else nn.Sequential(nn.Linear(d, hidden), nn.ReLU()))
        d = hidden
    layers.append(nn.Sequential(nn.Flatten(), nn.Linear(d, out_features)) if depth == 1
                  else nn.Linear(d, out_features))
    return layers
