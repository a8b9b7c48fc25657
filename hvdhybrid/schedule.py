"""Pipeline schedules as data: per-position action lists merged from per-stage ones, proven by simulation.

An action is ``F`` (forward of one microbatch), ``B`` (its backward) or ``W``
(the weight gradient, when split from ``B``), on one model stage, and prints
as ``2F0`` (stage 2, forward, microbatch 0), as torch.distributed.pipelining
does. ``B`` computes the input gradient; when a stage's plan has no ``W`` it
also computes the weight gradient (*fused*). Sends and receives are implied by
the stage graph: before ``F m`` a stage waits for the activations of ``m`` from
its upstream stages; after it, it sends its output downstream without blocking
(``Isend``). ``B m`` waits for the output gradients of ``m`` from downstream and
sends input gradients upstream. ``W m`` needs only the stage's own ``B m``.

A :class:`~hvdhybrid.placement.Placement` maps model stages to *positions*
(stage groups of a bundle). A plan holds one ordered list per position, and
every rank of that stage group runs the same list. Schedules are written per
model stage (:data:`SCHEDULES`); :func:`merge` serialises the lists of stages
that share a position, and :func:`simulate` proves the result. The drawings
are :func:`simulate` timelines (one column per tick, unit costs, ``.`` idle).

GPipe (fill-drain), 2 stages, 4 microbatches; backwards in forward order::

    position 0: 0F0 0F1 0F2 0F3   .   . 0B0 0B1 0B2 0B3
    position 1:   . 1F0 1F1 1F2 1F3 1B0 1B1 1B2 1B3   .

1F1B: a stage runs ``depth`` warm-up forwards (its distance to the sink), then
alternates one forward and one backward, then drains, so at most ``depth+1``
microbatches of activations are alive at a time instead of all of them::

    position 0: 0F0 0F1   . 0B0 0F2 0B1 0F3 0B2   . 0B3
    position 1:   . 1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3   .

ZB-H1 (``zb1``): 1F1B with ``W`` split off; the later a stage, the longer it
defers ``W``, so gradients reach the first stage sooner and the ``W`` fill the
drain. With ``F``, ``B`` and ``W`` one tick each (a fused ``B`` costs two) it
takes ``3M + P - 1`` ticks for ``M >= P`` where 1F1B takes ``3(M + P - 1)``::

    position 0: 0F0 0F1 0F2   .   . 0B0 0W0 0F3 0B1 0W1 0B2 0W2 0B3 0W3
    position 1:   . 1F0 1F1   . 1B0 1F2 1B1 1W0 1F3 1B2 1W1 1B3 1W2 1W3
    position 2:   .   . 2F0 2B0 2F1 2B1 2F2 2B2 2W0 2F3 2B3 2W1 2W2 2W3

A chain of 4 stages placed looped on 2 positions (stages 0,2 on position 0;
1,3 on position 1), 1F1B, 4 microbatches: 18 ticks for 32 actions, where the
contiguous placement (stages 0,1 on position 0) takes 20::

    position 0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3   . 2F2 0B0 2B1   . 2F3 0B1 2B2 2B3 0B2 0B3
    position 1:   . 1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 3F2 3B2 1F3 1B1 3F3 3B3 1B2 1B3   .
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import InputError
from .graph import StageGraph
from .placement import Placement, PlacementError

__all__ = ["Action", "Plan", "ScheduleError", "SCHEDULES", "SimResult", "gpipe", "one_f_one_b",
           "zero_bubble", "forward_only", "merge", "build", "build_forward_only", "simulate"]


class ScheduleError(InputError):
    """An unknown schedule name, or a plan the simulator proves incomplete, misplaced or deadlocked."""


_ACTION = re.compile(r"(\d+)([FBW])(\d+)")


@dataclass(frozen=True, order=True)
class Action:
    """One unit of pipeline work: ``kind`` (``F``, ``B`` or ``W``) of microbatch ``mb`` on ``stage``.

    Raises:
        ScheduleError: if ``kind`` is not ``F``, ``B`` or ``W``.
    """

    stage: int
    kind: str  # "F" forward, "B" backward (input grad; fused with W when the plan has no W), "W" weight grad
    mb: int

    def __post_init__(self) -> None:
        if self.kind not in ("F", "B", "W"):
            raise ScheduleError(f"action kind must be 'F', 'B' or 'W', got {self.kind!r}")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.mb}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """The inverse of ``str``: ``"2F0"`` -> ``Action(2, "F", 0)``.

        Args:
            text: stage number, one of ``F``/``B``/``W``, microbatch number.

        Returns:
            The action.

        Raises:
            ScheduleError: if ``text`` is not of that form.
        """
        m = _ACTION.fullmatch(text.strip())
        if not m:
            raise ScheduleError(
                f"cannot read action {text!r}: write stage, F/B/W and microbatch, e.g. '2F0'")
        return cls(int(m.group(1)), m.group(2), int(m.group(3)))


Plan = dict[int, list[Action]]
"""Position -> that position's ordered action list."""

StageSchedule = Callable[[StageGraph, int, int], list[Action]]


def _deps(graph: StageGraph, a: Action) -> list[Action]:
    """What ``a`` waits for: the whole dependency rule of every schedule, in one place."""
    if a.kind == "F":
        return [Action(u, "F", a.mb) for u in graph.upstream(a.stage)]
    if a.kind == "B":
        return [Action(a.stage, "F", a.mb)] + [Action(d, "B", a.mb) for d in graph.downstream(a.stage)]
    return [Action(a.stage, "B", a.mb)]


# -- per-stage schedules -------------------------------------------------------------


def gpipe(graph: StageGraph, stage: int, microbatches: int) -> list[Action]:
    """All forwards, then all backwards in the same microbatch order (fill-drain).

    Args:
        graph: the bundle's stage graph.
        stage: the model stage.
        microbatches: microbatches per step.

    Returns:
        ``F0 .. F(M-1) B0 .. B(M-1)`` of ``stage``.
    """
    return ([Action(stage, "F", m) for m in range(microbatches)]
            + [Action(stage, "B", m) for m in range(microbatches)])


def one_f_one_b(graph: StageGraph, stage: int, microbatches: int) -> list[Action]:
    """Warm up with ``depth(stage)`` forwards, then one forward / one backward, then drain.

    At most ``depth + 1`` microbatches of activations are alive on the stage.

    Args:
        graph: the bundle's stage graph.
        stage: the model stage.
        microbatches: microbatches per step.

    Returns:
        The stage's action list, with fused backwards.
    """
    warmup = min(graph.depth(stage), microbatches)
    out = [Action(stage, "F", m) for m in range(warmup)]
    for i in range(microbatches - warmup):
        out += [Action(stage, "F", warmup + i), Action(stage, "B", i)]
    out += [Action(stage, "B", m) for m in range(microbatches - warmup, microbatches)]
    return out


def zero_bubble(graph: StageGraph, stage: int, microbatches: int) -> list[Action]:
    """ZB-H1: 1F1B with the weight gradient split off; stages nearer the sink defer it longer.

    Forwards and input-gradient backwards run in 1F1B order, so at most
    ``depth + 1`` microbatches wait for a ``B``. The ``W`` of microbatch ``j``
    runs right after the ``B`` of ``j + lag``, with ``lag = D - depth(stage)``
    and ``D`` the depth of the deepest stage (a chain's first stage does not
    defer, its sink defers ``P - 1``): the sink returns gradients upstream
    without stopping for weight gradients, and the deferred ``W`` fill the
    drain, where 1F1B waits. With ``F``, ``B`` and ``W`` one tick each, a chain
    of ``P`` stages and ``M >= P`` microbatches takes ``3M + P - 1`` ticks,
    against ``3(M + P - 1)`` for 1F1B with a fused ``B`` of two ticks (Qi et
    al., *Zero Bubble Pipeline Parallelism*, 2023). At most ``lag + 1``
    microbatches keep weight-gradient inputs waiting for their ``W``.

    Args:
        graph: the bundle's stage graph.
        stage: the model stage.
        microbatches: microbatches per step.

    Returns:
        The stage's action list, with a ``W`` for every microbatch.
    """
    lag = max(graph.depth(s) for s in range(graph.num_stages)) - graph.depth(stage)
    out: list[Action] = []
    next_w = 0
    for a in one_f_one_b(graph, stage, microbatches):
        out.append(a)
        if a.kind == "B" and a.mb - next_w >= lag:
            out.append(Action(stage, "W", next_w))
            next_w += 1
    out += [Action(stage, "W", m) for m in range(next_w, microbatches)]
    return out


def forward_only(graph: StageGraph, stage: int, microbatches: int) -> list[Action]:
    """Evaluation: the forwards of ``stage``, in microbatch order.

    Args:
        graph: the bundle's stage graph.
        stage: the model stage.
        microbatches: microbatches per step.

    Returns:
        ``F0 .. F(M-1)`` of ``stage``.
    """
    return [Action(stage, "F", m) for m in range(microbatches)]


SCHEDULES: dict[str, StageSchedule] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "zb1": zero_bubble,
}
"""Training schedules by name: ``name -> per-stage generator (graph, stage, microbatches)``."""


# -- checks shared by merge and simulate -----------------------------------------------


def _check_placement(graph: StageGraph, placement: Placement) -> None:
    if placement.num_stages != graph.num_stages:
        raise PlacementError(
            f"placement {list(placement.positions)} covers {placement.num_stages} stages but the "
            f"stage graph has {graph.num_stages}; give one position per stage")


def _check_complete(graph: StageGraph, by_stage: dict[int, list[Action]], microbatches: int,
                    forward_only: bool) -> None:
    """Each stage runs F (and B) of every microbatch exactly once, and W for all of them or none."""
    mbs = range(microbatches)
    for s in range(graph.num_stages):
        acts = by_stage.get(s, [])
        got = set(acts)
        want = {Action(s, "F", m) for m in mbs}
        if not forward_only:
            want |= {Action(s, "B", m) for m in mbs}
            ws = {Action(s, "W", m) for m in mbs}
            if got & ws:
                want |= ws
        if len(acts) != len(got) or got != want:
            need = "F" if forward_only else "F and B (and W for all or none)"
            raise ScheduleError(
                f"stage {s}: actions {' '.join(map(str, acts)) or '(none)'} are not each {need} of "
                f"microbatches 0..{microbatches - 1} exactly once")


def _stuck(graph: StageGraph, placement: Placement, heads: dict[int, list[Action]],
           done: set[Action]) -> str:
    """'position 0 at 0B0 waits for 1B0 (on position 1); ...' for a deadlock report."""
    parts = []
    for p, acts in sorted(heads.items()):
        for a in acts:
            waits = [f"{d} (later on position {p} itself)" if placement.position_of(d.stage) == p
                     else f"{d} (on position {placement.position_of(d.stage)})"
                     for d in _deps(graph, a) if d not in done]
            parts.append(f"position {p} at {a} waits for {', '.join(waits)}")
    return "; ".join(parts)


# -- merge ---------------------------------------------------------------------------------


def _priority(a: Action) -> tuple[bool, int, int, int]:
    """Order of the ready heads of one position, smallest first (the rule is explained in :func:`merge`)."""
    return (a.kind == "W", a.mb, a.kind != "B", a.stage if a.kind == "F" else -a.stage)


def merge(graph: StageGraph, placement: Placement, per_stage: dict[int, list[Action]], microbatches: int,
          forward_only: bool = False) -> Plan:
    """Serialise the per-stage lists of stages that share a position into one list per position.

    Lock-step ticks: in each tick every position runs one *ready* head (the
    next action of one of its stages' lists whose dependencies ran in an
    earlier tick). Each stage's own order is kept. When several heads are
    ready, the position picks by these keys, in turn:

    1. ``F`` and ``B`` before ``W``: nothing waits for a weight gradient, so a
       ``W`` only fills ticks in which nothing else is ready (zero-bubble).
    2. The oldest microbatch first: every stage's list runs microbatches in
       order, so the oldest work is what the other positions wait for next,
       and finishing it first keeps fewer microbatches in flight.
    3. ``B`` before ``F``: a backward frees memory and feeds upstream stages.
    4. The action with the longer chain of work after it: for ``F`` the
       earlier stage (its output still has to pass the later stages), for
       ``B`` and ``W`` the later stage (its gradient still has to reach the
       earlier ones).

    Why microbatch age before kind or stage: over chains of 4, 6 and 8 stages
    and two fork/join graphs placed looped and contiguous on 2 to 4 positions
    with 1 to 8 microbatches, ordering by kind and stage alone (``B`` of the
    later stage, then ``F`` of the earlier one) gave 3-18% longer summed
    makespans than this rule (GPipe, 1F1B and ZB-H1; unit costs or ``B``
    costing 2; transfer time 0 or 0.5), which stayed within 1% of the best
    of the seven orderings tried.

    Args:
        graph: the bundle's stage graph.
        placement: which position runs each stage.
        per_stage: stage -> that stage's action list (e.g. from :data:`SCHEDULES`).
        microbatches: microbatches per step.
        forward_only: the lists hold forwards only.

    Returns:
        The plan: position -> ordered action list.

    Raises:
        PlacementError: if the placement does not cover the graph's stages.
        ScheduleError: if a list holds another stage's actions, is incomplete,
            or the lists deadlock (naming the stuck positions).
    """
    _check_placement(graph, placement)
    extra = sorted(s for s in per_stage if not 0 <= s < graph.num_stages)
    if extra:
        raise ScheduleError(f"lists for stages {extra}, but the stage graph has {graph.num_stages} stages")
    for s, acts in per_stage.items():
        wrong = [str(a) for a in acts if a.stage != s]
        if wrong:
            raise ScheduleError(f"the list of stage {s} holds actions of other stages: {' '.join(wrong)}")
    _check_complete(graph, per_stage, microbatches, forward_only)
    nxt = {s: 0 for s in range(graph.num_stages)}
    plan: Plan = {p: [] for p in range(placement.num_positions)}
    done: set[Action] = set()
    left = sum(len(per_stage[s]) for s in nxt)
    while left:
        ran = []
        for p in plan:
            ready = [per_stage[s][nxt[s]] for s in placement.stages_on(p)
                     if nxt[s] < len(per_stage[s])
                     and all(d in done for d in _deps(graph, per_stage[s][nxt[s]]))]
            if ready:
                ran.append((p, min(ready, key=_priority)))
        if not ran:
            heads = {p: [per_stage[s][nxt[s]] for s in placement.stages_on(p) if nxt[s] < len(per_stage[s])]
                     for p in plan}
            raise ScheduleError(f"per-stage lists deadlock: {_stuck(graph, placement, heads, done)}")
        for p, a in ran:
            plan[p].append(a)
            done.add(a)
            nxt[a.stage] += 1
            left -= 1
    return plan


# -- build -----------------------------------------------------------------------------------


def _default(graph: StageGraph, placement: Optional[Placement], microbatches: int) -> Placement:
    if microbatches < 1:
        raise ScheduleError(f"a step needs at least one microbatch, got {microbatches}")
    return Placement.identity(graph.num_stages) if placement is None else placement


def build(name: str, graph: StageGraph, microbatches: int, placement: Optional[Placement] = None) -> Plan:
    """The plan of training schedule ``name``: per-stage lists, merged per position, proven.

    Args:
        name: a key of :data:`SCHEDULES`.
        graph: the bundle's stage graph.
        microbatches: microbatches per step, at least 1.
        placement: which position runs each stage; ``None`` for one stage per position.

    Returns:
        Position -> ordered action list.

    Raises:
        ScheduleError: on an unknown name (listing the choices), fewer than one
            microbatch, or a plan :func:`simulate` rejects.
        PlacementError: if the placement does not cover the graph's stages.
    """
    try:
        fn = SCHEDULES[name]
    except KeyError:
        raise ScheduleError(
            f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None
    placement = _default(graph, placement, microbatches)
    per_stage = {s: fn(graph, s, microbatches) for s in range(graph.num_stages)}
    plan = merge(graph, placement, per_stage, microbatches)
    simulate(graph, placement, plan, microbatches)
    return plan


def build_forward_only(graph: StageGraph, microbatches: int, placement: Optional[Placement] = None) -> Plan:
    """The evaluation plan: forwards only, merged per position, proven.

    Args:
        graph: the bundle's stage graph.
        microbatches: microbatches per step, at least 1.
        placement: which position runs each stage; ``None`` for one stage per position.

    Returns:
        Position -> ordered action list.

    Raises:
        ScheduleError: on fewer than one microbatch.
        PlacementError: if the placement does not cover the graph's stages.
    """
    placement = _default(graph, placement, microbatches)
    per_stage = {s: forward_only(graph, s, microbatches) for s in range(graph.num_stages)}
    plan = merge(graph, placement, per_stage, microbatches, forward_only=True)
    simulate(graph, placement, plan, microbatches, forward_only=True)
    return plan


# -- simulate --------------------------------------------------------------------------------


@dataclass
class SimResult:
    """What :func:`simulate` found.

    Attributes:
        timeline: one row per lock-step tick (unit costs, no transfer time),
            one column per position: the action it ran, ``""`` when idle.
        makespan: time until the last action finishes, with the given costs
            and transfer time; ``len(timeline)`` with unit costs and ``comm=0``.
        finish: when each action finishes.
    """

    timeline: list[list[str]]
    makespan: float
    finish: dict[Action, float] = field(default_factory=dict)


def simulate(graph: StageGraph, placement: Placement, plan: Plan, microbatches: int,
             forward_only: bool = False, costs: Optional[Callable[[Action], float]] = None,
             comm: float = 0.0) -> SimResult:
    """Prove that a plan is complete, correctly placed and deadlock-free; time it.

    Every stage must run ``F`` and ``B`` of every microbatch exactly once (only
    ``F`` when ``forward_only``), plus ``W`` of every microbatch or of none, and
    each action must be in the list of the position its stage is placed on.
    Dependencies: ``F m`` needs ``F m`` of every upstream stage; ``B m`` needs
    its own ``F m`` and ``B m`` of every downstream stage; ``W m`` needs its own
    ``B m``. Sends never block, so an action can run as soon as these ran.

    Timing is event-driven: each position runs its list in order, and an action
    starts when the position is free and every dependency has finished, plus
    ``comm`` for a dependency on another position.

    Args:
        graph: the bundle's stage graph.
        placement: which position runs each stage.
        plan: position -> ordered action list.
        microbatches: microbatches per step.
        forward_only: the plan is an evaluation plan (forwards only).
        costs: duration of an action; 1 for every action when ``None``.
        comm: transfer time added to a dependency that crosses positions.

    Returns:
        The lock-step timeline, the makespan and every action's finish time.

    Raises:
        PlacementError: if the placement does not cover the graph's stages.
        ScheduleError: on a list for a position that does not exist, an action
            on the wrong position, a missing, duplicate or extra action, or a
            deadlock (naming the stuck positions and what each waits for).
    """
    _check_placement(graph, placement)
    npos = placement.num_positions
    extra = sorted(p for p in plan if not 0 <= p < npos)
    if extra:
        raise ScheduleError(
            f"plan has lists for positions {extra}, but the placement has {npos} (0..{npos - 1})")
    lists = {p: plan.get(p, []) for p in range(npos)}
    by_stage: dict[int, list[Action]] = {}
    for p, acts in lists.items():
        for a in acts:
            if not 0 <= a.stage < graph.num_stages:
                raise ScheduleError(f"action {a} on position {p} names stage {a.stage}, but the graph "
                                    f"has {graph.num_stages} stages")
            if placement.position_of(a.stage) != p:
                raise ScheduleError(f"action {a} is in the list of position {p}, but the placement runs "
                                    f"stage {a.stage} on position {placement.position_of(a.stage)}")
            by_stage.setdefault(a.stage, []).append(a)
    _check_complete(graph, by_stage, microbatches, forward_only)

    # Lock-step: the shape of the plan, and the deadlock proof.
    nxt = {p: 0 for p in lists}
    done: set[Action] = set()
    timeline: list[list[str]] = []
    order: list[Action] = []
    while any(nxt[p] < len(lists[p]) for p in lists):
        heads = {p: [lists[p][nxt[p]]] for p in lists if nxt[p] < len(lists[p])}
        ran = [a for (a,) in heads.values() if all(d in done for d in _deps(graph, a))]
        if not ran:
            raise ScheduleError(f"schedule deadlocks: {_stuck(graph, placement, heads, done)}")
        row = [""] * npos
        for a in ran:
            p = placement.position_of(a.stage)
            row[p] = str(a)
            done.add(a)
            nxt[p] += 1
        timeline.append(row)
        order += ran

    # Event-driven timing with costs. The lock-step order above runs every
    # action after its dependencies, so one pass in that order is enough.
    cost = costs or (lambda a: 1.0)
    free = [0.0] * npos
    finish: dict[Action, float] = {}
    for a in order:
        p = placement.position_of(a.stage)
        start = free[p]
        for d in _deps(graph, a):
            start = max(start, finish[d] + (comm if placement.position_of(d.stage) != p else 0.0))
        finish[a] = free[p] = start + float(cost(a))
    return SimResult(timeline, max(finish.values(), default=0.0), finish)
