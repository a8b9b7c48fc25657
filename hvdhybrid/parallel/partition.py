"""Cut a sequence of layers into contiguous stages: uniform, by parameter count, by measured time."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import InputError

__all__ = ["PartitionError", "balance", "uniform", "by_params", "by_time", "STRATEGIES"]


class PartitionError(InputError):
    """More stages than layers, or costs that cannot be split."""


def _check(n_layers: int, parts: int) -> None:
    if parts < 1:
        raise PartitionError(f"need at least one stage, got {parts}")
    if parts > n_layers:
        raise PartitionError(
            f"cannot split {n_layers} layers into {parts} stages: every stage needs a layer; "
            f"use at most {n_layers} stages")


def balance(costs: Sequence[float], parts: int) -> list[int]:
    """Contiguous split of ``costs`` into ``parts`` non-empty runs minimising the largest sum.

    Returns:
        Layer counts per stage (they sum to ``len(costs)``). Exact, by dynamic programming.
    """
    n = len(costs)
    _check(n, parts)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: minimal max-cost of splitting the first i layers into k runs
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    sizes, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def uniform(layers: Sequence[nn.Module], parts: int, sample: torch.Tensor | None = None) -> list[int]:
    """As even a number of layers per stage as possible (earlier stages get the extra)."""
    _check(len(layers), parts)
    q, r = divmod(len(layers), parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


def by_params(layers: Sequence[nn.Module], parts: int, sample: torch.Tensor | None = None) -> list[int]:
    """Balance the parameter count (a layer without parameters counts as 1)."""
    return balance([max(1, sum(p.numel() for p in m.parameters())) for m in layers], parts)


def by_time(layers: Sequence[nn.Module], parts: int, sample: torch.Tensor | None = None,
            repeats: int = 3) -> list[int]:
    """Balance forward+backward time measured on ``sample`` (the model's input)."""
    if sample is None:
        raise PartitionError("partition by time needs a sample input")
    costs = []
    x = sample
    for layer in layers:
        best = float("inf")
        for _ in range(repeats):
            inp = x.detach().requires_grad_(x.is_floating_point())
            t0 = time.perf_counter()
            y = layer(inp)
            y.float().sum().backward()
            best = min(best, time.perf_counter() - t0)
        layer.zero_grad(set_to_none=True)
        costs.append(best)
        x = y.detach()
    return balance(costs, parts)


STRATEGIES: dict[str, Callable[..., list[int]]] = {
    "uniform": uniform, "params": by_params, "time": by_time,
}
