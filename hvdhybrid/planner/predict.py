"""A layout's step time from measured costs: the schedule simulator over per-action times, then the
average across bundles and the optimizer step (pure arithmetic; no MPI, no torch).

- ``F`` of a stage costs its measured forward, ``B`` its backward (where the schedule splits ``W``
  off, the measured split ``B``; ``W`` the measured ``W`` per microbatch it covers), plus the stage's tensor
  all-reduces on the link (and, on a host with more ranks than cores and other ranks than the group's,
  a wait each for the group's rank that was put off its core: as long as it computes between two
  collectives, up to a wake-up).
- A host's cores are shared by its busy ranks (waiting ranks yield): the schedule takes the longer of
  its simulated critical path and the host's work divided by its cores. With 4 ranks on 2 cores, 4
  bundles of one stage run at half speed, while a pipeline's ranks that wait for each other do not.
  More ranks than cores all computing cost more than their share (their working sets outgrow the
  caches): the host's work is scaled by the slowdown measured with every rank of a host busy.
- A dependency that crosses stage groups costs the point-to-point time of the largest message a stage
  sends (the simulator takes one transfer time).
- Across hosts (a hostfile, or a run's ranks on several hosts): a hop, a tensor group or a data group
  whose ranks are on different hosts runs on the link between hosts, the others on the link inside one.
- After the schedule: the gradients' average across bundles as a ring all-reduce (fp16 halves the
  bytes; ``--zero 2`` a reduce-scatter, and ``--zero 1/2`` an all-gather of the parameters), then the
  optimizer step over the rank's parameters (its share under ``--zero``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

from ..layout.placement import Placement
from ..layout.topology import Layout
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
              per_host: int = 1, cores: int = 1, fp16: bool = True,
              allreduce: Optional[Link] = None, remote: Optional[Link] = None,
              hosts: Sequence[str] = (), layout: Optional[Layout] = None, crowd: float = 1.0) -> Prediction:
    """The predicted step of ``choice``: ``plan`` (position -> actions) over ``graph`` placed by
    ``placement``; ``times``: model stage -> its measured :class:`StageTime` at the choice's rows (one
    thread per rank where ranks outnumber cores); ``elements``: parameter elements per position;
    ``per_host`` ranks share a host's ``cores``; ``allreduce``: the link the average across bundles
    sees (default ``link``). Across hosts: ``hosts`` names each rank's host in ``layout`` (then
    ``per_host`` is counted from it), and a group whose ranks are on more than one host talks over
    ``remote`` (``link``: inside a host). ``crowd``: how much more than its share of the cores a host
    whose ranks outnumber its cores costs when they all compute (caches, memory bandwidth)."""
    split = {(a.stage, m) for acts in plan.values() for a in acts if a.kind == "W" for m in a.mbs}
    hop_link, tensor_link, ar = link, link, allreduce or link
    rows_link = link  # a stage group's row replicas average first (MPI, fp32), then across bundles
    if hosts and layout is not None:
        per_host = max(Counter(hosts).values())
        if remote is not None:
            def crosses(ranks: Sequence[int]) -> bool:
                return len({hosts[r] for r in ranks}) > 1

            if any(crosses([layout.rank_of(0, s, 0), layout.rank_of(0, s + 1, 0)])
                   for s in range(layout.num_stages - 1)):
                hop_link = remote
            if crosses(layout.tensor_members(0, 0, 0)):
                tensor_link = remote
            ar = remote if crosses(layout.data_members(0, 0)) else link
            if any(crosses(layout.row_members(0, p, 0)) for p in range(layout.num_stages)):
                rows_link = remote

    # On a host with more ranks than cores and ranks outside the tensor group, a collective often waits
    # for a rank of its group that another rank's work put off its core: about as long as that rank
    # computes between collectives, up to a wake-up.
    crowded_group = per_host > cores and per_host > choice.tensor

    def tensor(st: StageTime, seconds: float) -> float:
        if choice.tensor <= 1 or not st.tensor_calls:
            return 0.0
        half = st.tensor_calls / 2  # F and B half each
        meet = min(link.wake, seconds / half) if crowded_group else 0.0
        return half * (tensor_link.allreduce(st.tensor_bytes / st.tensor_calls, choice.tensor) + meet)

    def cost(a: Action) -> float:
        st = times[a.stage]
        if a.kind == "F":
            return st.forward + tensor(st, st.forward)
        if a.kind == "B":
            b = st.b((a.stage, a.mb) in split)
            return b + tensor(st, b)  # the input gradients' all-reduces are all B's; W has none
        if a.kind == "W":
            return st.w() * a.n
        return 0.0

    # a stage's message wakes a rank that waited while others computed (on its host, or across hosts)
    hop = hop_link.time(max((t.out_bytes for t in times.values()), default=0)) + max(link.wake, hop_link.wake)
    sim = simulate(graph, placement, plan, choice.microbatches, costs=cost, comm=hop)
    # The host's cores are shared by its busy ranks only (a waiting rank yields its core): the schedule
    # takes its critical path, or the host's work spread over its cores, whichever is longer.
    widths = list(layout.widths) if layout is not None else [1] * len(plan)
    work = sum(cost(a) * widths[pos] for pos, acts in plan.items() for a in acts)  # every rank of a bundle
    ranks = choice.tensor * sum(widths) * choice.bundles
    crowded = crowd if per_host > cores else 1.0
    makespan = max(sim.makespan, work * choice.tensor * choice.bundles * per_host / ranks / cores * crowded)
    b = choice.bundles
    each = [rows_link.allreduce(4 * e, w) + _average(e, b, choice.zero, fp16, ar)
            for e, w in zip(elements, widths)]
    # the stage groups average at once: inside a host each on its own, across hosts all through its link
    shared = remote is not None and (ar is remote or rows_link is remote)
    reduce = sum(each) if shared else max(each, default=0.0)
    most = max(elements, default=0)
    share = most / b if choice.zero and b > 1 else most
    opt = share * opt_per_element * max(1.0, per_host / cores) * crowded  # every rank steps at once
    return Prediction(makespan + reduce + opt, makespan, reduce, opt)


def _average(elements: int, ranks: int, zero: int, fp16: bool, ar: Link) -> float:
    """The average of a position's gradients over ``ranks`` (a ring; fp16 halves the bytes; ``--zero
    2`` a reduce-scatter, and ``--zero 1/2`` an all-gather of the parameters)."""
    if ranks <= 1:
        return 0.0
    wire = (2 if fp16 else 4) * elements
    if zero == 2:
        return ar.allgather(wire, ranks) + ar.allgather(4 * elements, ranks)
    return ar.allreduce(wire, ranks) + (ar.allgather(4 * elements, ranks) if zero == 1 else 0.0)
