"""A layout's step time from measured costs: the schedule simulator over per-action times, then the
average across bundles and the optimizer step (pure arithmetic; no MPI, no torch).

- ``F`` of a stage costs its measured forward, ``B`` its backward (half of it where the schedule
  splits ``W`` off; ``W`` the other half per microbatch it covers), each scaled by how oversubscribed
  the host is (ranks per core), plus the stage's tensor all-reduces on the link.
- A dependency that crosses stage groups costs the point-to-point time of the largest message a stage
  sends (the simulator takes one transfer time).
- After the schedule: the gradients' average across bundles as a ring all-reduce (fp16 halves the
  bytes; ``--zero 2`` a reduce-scatter, and ``--zero 1/2`` an all-gather of the parameters), then the
  optimizer step over the rank's parameters (its share under ``--zero``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..layout.placement import Placement
from ..parallel.graph import StageGraph
from ..pipeline.actions import Action, Plan
from ..pipeline.simulator import simulate
from .links import Link
from .probe import StageTime
from .space import Choice

__all__ = ["Prediction", "step_time"]


@dataclass(frozen=True)
class Prediction:
    """Seconds per step, and its parts."""

    step: float
    pipeline: float  # the simulated schedule
    reduce: float  # the average across bundles (and the --zero all-gather)
    optimizer: float

    def as_dict(self) -> dict[str, float]:
        return {"step_s": self.step, "pipeline_s": self.pipeline, "reduce_s": self.reduce,
                "optimizer_s": self.optimizer}


def step_time(choice: Choice, graph: StageGraph, placement: Placement, plan: Plan,
              times: dict[int, StageTime], link: Link, elements: Sequence[int], opt_per_element: float,
              oversubscribed: float = 1.0, fp16: bool = True) -> Prediction:
    """The predicted step of ``choice``: ``plan`` (position -> actions) over ``graph`` placed by
    ``placement``; ``times``: model stage -> its measured :class:`StageTime` at the choice's rows;
    ``elements``: parameter elements per position; ``oversubscribed``: ranks per core on a host (>= 1)."""
    split = {(a.stage, m) for acts in plan.values() for a in acts if a.kind == "W" for m in a.mbs}

    def tensor(st: StageTime) -> float:
        if choice.tensor <= 1 or not st.tensor_calls:
            return 0.0
        per = st.tensor_bytes / st.tensor_calls
        return st.tensor_calls * link.allreduce(per, choice.tensor) / 2  # half in F, half in B

    def cost(a: Action) -> float:
        st = times[a.stage]
        if a.kind == "F":
            return st.forward * oversubscribed + tensor(st)
        if a.kind == "B":
            whole = st.backward * oversubscribed + tensor(st)
            return whole / 2 if (a.stage, a.mb) in split else whole
        if a.kind == "W":
            return st.backward * oversubscribed / 2 * a.n
        return 0.0

    hop = link.time(max((t.out_bytes for t in times.values()), default=0))
    sim = simulate(graph, placement, plan, choice.microbatches, costs=cost, comm=hop)
    most = max(elements, default=0)
    b = choice.bundles
    wire = (2 if fp16 else 4) * most
    if b <= 1:
        reduce = 0.0
    elif choice.zero == 2:
        reduce = link.allgather(wire, b) + link.allgather(4 * most, b)
    else:
        reduce = link.allreduce(wire, b) + (link.allgather(4 * most, b) if choice.zero == 1 else 0.0)
    share = most / b if choice.zero and b > 1 else most
    opt = share * opt_per_element * oversubscribed
    return Prediction(sim.makespan + reduce + opt, sim.makespan, reduce, opt)
