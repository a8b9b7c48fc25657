"""StageGraph: which stage of a bundle feeds which (a chain, or a fork and a join)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from ..errors import InputError

__all__ = ["GraphError", "StageGraph"]


class GraphError(InputError):
    """A stage graph that cannot be run (cycle, no single sink, bad edge)."""


@dataclass(frozen=True)
class StageGraph:
    """A directed acyclic graph over the stages of one bundle.

    Stage numbers are a topological order: every edge goes from a lower to a
    higher stage. Exactly one stage (the highest) is the *sink*: it computes the
    loss. Stages in ``batch_stages`` get the microbatch's inputs as their first
    argument (by default every stage without upstream edges)::

        chain(3):      0 -> 1 -> 2            (a pipeline)
        fork/join:     0 --> 2 <-- 1          (two encoders side by side, joined)

    Each edge carries the whole output (a tensor or tuple of tensors) of its
    source stage; a stage with several upstream edges gets their outputs in the
    order of ``edges``.
    """

    num_stages: int
    edges: tuple[tuple[int, int], ...]
    batch_stages: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        k = self.num_stages
        if k < 1:
            raise GraphError(f"a stage graph needs at least one stage, got {k}")
        seen = set()
        for src, dst in self.edges:
            if not (0 <= src < dst < k):
                raise GraphError(
                    f"edge {src}->{dst} is invalid for {k} stages: edges must go from a "
                    "lower to a higher stage number (stages are numbered in topological order)"
                )
            if (src, dst) in seen:
                raise GraphError(f"edge {src}->{dst} is listed twice")
            seen.add((src, dst))
        sinks = [s for s in range(k) if not self.downstream(s)]
        if sinks != [k - 1]:
            raise GraphError(
                f"stage graph must have exactly one sink, the last stage {k - 1}; "
                f"stages without outgoing edges: {sinks}"
            )
        if not self.batch_stages:
            object.__setattr__(self, "batch_stages",
                               frozenset(s for s in range(k) if not self.upstream(s)))
        outside = sorted(s for s in self.batch_stages if not 0 <= s < k)
        if outside:
            raise GraphError(f"batch stages {outside} do not exist in a graph of {k} stages")
        bad = [s for s in range(k) if not self.upstream(s) and s not in self.batch_stages]
        if bad:
            raise GraphError(f"stages {bad} have no upstream edge and no batch input")

    @classmethod
    def chain(cls, num_stages: int) -> StageGraph:
        """A pipeline ``0 -> 1 -> ... -> num_stages-1``."""
        return cls(num_stages, tuple((s, s + 1) for s in range(num_stages - 1)))

    @cached_property
    def _up(self) -> dict[int, list[int]]:
        return {s: [a for a, b in self.edges if b == s] for s in range(self.num_stages)}

    @cached_property
    def _down(self) -> dict[int, list[int]]:
        return {s: [b for a, b in self.edges if a == s] for s in range(self.num_stages)}

    def upstream(self, stage: int) -> list[int]:
        return self._up[stage]

    def downstream(self, stage: int) -> list[int]:
        return self._down[stage]

    def edge_index(self, src: int, dst: int) -> int:
        return self.edges.index((src, dst))

    @property
    def sink(self) -> int:
        return self.num_stages - 1

    def depth(self, stage: int) -> int:
        """Longest number of edges from ``stage`` to the sink (0 for the sink)."""
        down = self.downstream(stage)
        return 0 if not down else 1 + max(self.depth(d) for d in down)

    def is_chain(self) -> bool:
        return self.edges == tuple((s, s + 1) for s in range(self.num_stages - 1))
