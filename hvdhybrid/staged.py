"""A model cut into stages: the stage graph, one module per stage, full-model parameter names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .graph import StageGraph
from .partition import STRATEGIES, PartitionError

__all__ = ["StagedModel", "Part", "partition_sizes", "split_sequential"]


class Part(nn.Module):
    """Layers ``first .. first+len-1`` of a sequential model, applied in order.

    Parameters keep their full-model names: layer ``i`` is registered as ``str(i)``,
    exactly as in ``nn.Sequential(*all_layers)``.
    """

    def __init__(self, layers: Sequence[nn.Module], first: int) -> None:
        super().__init__()
        self.first = first
        for i, layer in enumerate(layers):
            self.add_module(str(first + i), layer)

    def forward(self, x: Any) -> Any:
        for layer in self._modules.values():  # not children(): a reused module runs each time
            assert layer is not None
            x = layer(x)
        return x


@dataclass
class StagedModel:
    """What a model hands the runtime: graph, stage modules (all, on every rank) and the loss.

    Every rank builds the whole model from the same seed and keeps its stage,
    so every layout starts from the same parameters as a single process.
    """

    graph: StageGraph
    stages: list[nn.Module]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    #: name prefix of each stage's parameters in the full model ("" when the
    #: stage modules already use full names, as :class:`Part` does)
    prefixes: Optional[list[str]] = None

    def stage_parameters(self, stage: int, module: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
        """Parameters of ``stage`` by full-model name."""
        prefix = self.prefixes[stage] if self.prefixes else ""
        m = self.stages[stage] if module is None else module
        return {prefix + n: p for n, p in m.named_parameters()}

    def full(self) -> Callable[[Any], Any]:
        """The unsplit forward (single process), for references and evaluation."""
        def run(inputs: Any) -> Any:
            outs: dict[int, Any] = {}
            for s in range(self.graph.num_stages):
                args = [inputs] if s in self.graph.batch_stages else []
                args += [outs[u] for u in self.graph.upstream(s)]
                outs[s] = self.stages[s](*args)
            return outs[self.graph.sink]
        return run


def partition_sizes(layers: Sequence[nn.Module], num_stages: int, strategy: str,
                    sample: torch.Tensor | None = None) -> list[int]:
    """Layer counts per stage for ``strategy`` (``uniform``, ``params`` or ``time``).

    ``time`` measures on this rank: under MPI compute it on one rank and
    broadcast it, or stages will disagree about where the cuts are.
    """
    try:
        fn = STRATEGIES[strategy]
    except KeyError:
        raise PartitionError(
            f"unknown partition {strategy!r}; choose one of {', '.join(STRATEGIES)}") from None
    return fn(layers, num_stages, sample)


def split_sequential(layers: Sequence[nn.Module], sizes: Sequence[int],
                     loss_fn: Callable[[Any, Any], torch.Tensor]) -> StagedModel:
    """Cut ``layers`` into a chain of parts with ``sizes`` layers each."""
    if sum(sizes) != len(layers) or any(n < 1 for n in sizes):
        raise PartitionError(f"stage sizes {list(sizes)} do not cover {len(layers)} layers")
    parts: list[nn.Module] = []
    first = 0
    for n in sizes:
        parts.append(Part(layers[first:first + n], first))
        first += n
    return StagedModel(StageGraph.chain(len(sizes)), parts, loss_fn)
