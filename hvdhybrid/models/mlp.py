"""A plain multilayer perceptron as a sequence of layers (benchmarks, fast tests)."""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["mlp_layers", "mlp_layer_fns"]


def mlp_layer_fns(in_features: int, hidden: int, depth: int,
                  out_features: int) -> list[Callable[[], nn.Module]]:
    """``depth`` layer factories: (Linear+ReLU) x (depth-1), then a Linear head; flattens its input.

    Factories, not modules, so that a rank builds only the layers of its own
    stages (:func:`hvdhybrid.parallel.staged.sequential_model`).
    """
    def hidden_layer(d: int, first: bool) -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            lin = [nn.Linear(d, hidden), nn.ReLU()]
            return nn.Sequential(nn.Flatten(), *lin) if first else nn.Sequential(*lin)
        return make

    def head(d: int, first: bool) -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            return nn.Sequential(nn.Flatten(), nn.Linear(d, out_features)) if first else \
                nn.Linear(d, out_features)
        return make

    fns = [hidden_layer(in_features if i == 0 else hidden, i == 0) for i in range(depth - 1)]
    return fns + [head(in_features if depth == 1 else hidden, depth == 1)]


def mlp_layers(in_features: int, hidden: int, depth: int, out_features: int) -> list[nn.Module]:
    """The layers of :func:`mlp_layer_fns`, built in order under the current RNG."""
    return [f() for f in mlp_layer_fns(in_features, hidden, depth, out_features)]
