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

A :class:`~hvdhybrid.layout.placement.Placement` maps model stages to *positions*
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

Token slices (TeraPipe, :func:`sliced`): every schedule also runs with each
sequence cut into ``S`` slices along the token axis. Each ``F m`` of a
stage's list becomes the forwards of slices ``0 .. S-1`` of ``m``, each ``B m``
(and ``W m``) its backwards of slices ``S-1 .. 0``. Stage 1 works on slice
``i`` while stage 0 works on slice ``i+1``, so one sequence fills the
pipeline. GPipe, 2 stages, 1 sequence in 4 slices::

    position 0: 0F0 0F0.1 0F0.2 0F0.3     .     . 0B0.3 0B0.2 0B0.1 0B0
    position 1:   .   1F0 1F0.1 1F0.2 1F0.3 1B0.3 1B0.2 1B0.1   1B0   .
"""

from __future__ import annotations

from typing import Callable, Optional

from ..layout.placement import Placement
from ..parallel.graph import StageGraph
from .actions import Action, Plan, ScheduleError
from .simulator import SimResult, merge, simulate
from .virtual import POSITION_SCHEDULES, V_SCHEDULES

__all__ = ["Action", "Plan", "ScheduleError", "SCHEDULES", "NAMES", "POSITION_SCHEDULES", "SimResult",
           "gpipe", "one_f_one_b", "with_reduce", "batch_weights", "has_split_w", "SPLIT_W",
           "zero_bubble", "forward_only", "sliced", "merge", "build", "build_forward_only", "simulate"]

StageSchedule = Callable[[StageGraph, int, int], list[Action]]


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

NAMES: tuple[str, ...] = (*SCHEDULES, *POSITION_SCHEDULES)
"""Every training schedule: the per-stage ones, then those written per position (:mod:`.virtual`)."""

SPLIT_W: tuple[str, ...] = ("zb1", *V_SCHEDULES)
"""The schedules that split ``W`` from ``B`` (their ``W`` can be batched: :func:`batch_weights`)."""


def sliced(actions: list[Action], slices: int) -> list[Action]:
    """A stage's list with every sequence cut into ``slices`` token slices.

    ``F m`` becomes ``F m.0 .. F m.(S-1)``; ``B m`` and ``W m`` become slices
    ``S-1 .. 0``: a slice's backward needs the key/value gradients of the
    later slices that attended to it.

    Args:
        actions: a stage's list with whole sequences (slice 0).
        slices: token slices per sequence, at least 1.

    Returns:
        The stage's list over (microbatch, slice) units.
    """
    if slices < 1:
        raise ScheduleError(f"a sequence needs at least one token slice, got {slices}")
    order = {"F": range(slices), "B": range(slices - 1, -1, -1), "W": range(slices - 1, -1, -1)}
    return [Action(a.stage, a.kind, a.mb, i) for a in actions for i in order[a.kind]]


def with_reduce(plan: Plan, after: bool = False) -> Plan:
    """``plan`` with each stage's reduce ``R``: right after the stage's last action in its position's
    list (the reduce overlaps what the position runs next), or, with ``after``, all at the end of the
    list (the reduce after the schedule)."""
    out: Plan = {}
    for p, acts in plan.items():
        acts = [a for a in acts if a.kind != "R"]
        last = {a.stage: i for i, a in enumerate(acts)}
        if after:
            out[p] = acts + [Action(s, "R", 0) for s in sorted(last, key=lambda s: last[s])]
            continue
        lst: list[Action] = []
        for i, a in enumerate(acts):
            lst.append(a)
            if last[a.stage] == i:
                lst.append(Action(a.stage, "R", 0))
        out[p] = lst
    return out


def has_split_w(plan: Plan) -> bool:
    """Whether ``plan`` computes weight gradients apart from ``B`` (a ``W`` action)."""
    return any(a.kind == "W" for acts in plan.values() for a in acts)


def batch_weights(plan: Plan, per: int) -> Plan:
    """``plan`` with each stage's ``W`` actions batched ``per`` at a time: the ``W`` of microbatches
    ``m .. m+per-1`` become one action where the last of them was (a ``W`` may only run later than
    planned: nothing but the step's end waits for it), which the executor runs as one product per
    weight over their concatenated rows. A stage's last batch takes what is left. Token slices'
    ``W`` (a whole backward each) and plans without ``W`` are returned as they are.

    Args:
        plan: position -> ordered action list.
        per: microbatches per batched ``W``, at least 1 (1: as it is).

    Returns:
        The plan with batched ``W``.

    Raises:
        ScheduleError: if ``per`` is below 1.
    """
    if per < 1:
        raise ScheduleError(f"a batched W covers at least one microbatch, got {per}")
    if per == 1:
        return plan
    out: Plan = {}
    for p, acts in plan.items():
        ws: dict[int, list[int]] = {}
        for i, a in enumerate(acts):
            if a.kind == "W":
                ws.setdefault(a.stage, []).append(i)
        at: dict[int, Action] = {}  # index of a chunk's last W -> the batched action
        for s, idx in ws.items():
            mbs = [acts[i].mb for i in idx]
            in_order = mbs == list(range(mbs[0], mbs[0] + len(mbs)))
            if any(acts[i].slice or acts[i].n > 1 for i in idx) or not in_order:
                at.update({i: acts[i] for i in idx})  # sliced, already batched or out of order: as it is
                continue
            for c in range(0, len(idx), per):
                chunk = idx[c:c + per]
                at[chunk[-1]] = Action(s, "W", acts[chunk[0]].mb, 0, len(chunk))
        out[p] = [at[i] if a.kind == "W" else a for i, a in enumerate(acts) if a.kind != "W" or i in at]
    return out


# -- build -----------------------------------------------------------------------------------


def _plan(fn: StageSchedule, graph: StageGraph, microbatches: int, placement: Optional[Placement],
          forward_only: bool, slices: int = 1) -> Plan:
    """Per-stage lists from ``fn``, sliced, merged per position, proven by :func:`simulate`."""
    if microbatches < 1:
        raise ScheduleError(f"a step needs at least one microbatch, got {microbatches}")
    placement = Placement.identity(graph.num_stages) if placement is None else placement
    per_stage = {s: sliced(fn(graph, s, microbatches), slices) for s in range(graph.num_stages)}
    plan = merge(graph, placement, per_stage, microbatches, forward_only=forward_only, slices=slices)
    simulate(graph, placement, plan, microbatches, forward_only=forward_only, slices=slices)
    return plan


def build(name: str, graph: StageGraph, microbatches: int, placement: Optional[Placement] = None,
          slices: int = 1, batch_w: int = 1) -> Plan:
    """The plan of training schedule ``name``: per-stage lists, merged per position, proven.

    Args:
        name: one of :data:`NAMES` (per-stage :data:`SCHEDULES`, or per-position ones).
        graph: the bundle's stage graph.
        microbatches: microbatches per step, at least 1.
        placement: which position runs each stage; ``None`` for one stage per position.
        slices: token slices per sequence (:func:`sliced`); 1 for whole sequences.
        batch_w: microbatches per ``W`` (:func:`batch_weights`); 1 for one each.

    Returns:
        Position -> ordered action list.

    Raises:
        ScheduleError: on an unknown name (listing the choices), fewer than one
            microbatch or slice, or a plan :func:`simulate` rejects.
        PlacementError: if the placement does not cover the graph's stages.
    """
    placement = Placement.identity(graph.num_stages) if placement is None else placement
    if name in POSITION_SCHEDULES:
        if microbatches < 1:
            raise ScheduleError(f"a step needs at least one microbatch, got {microbatches}")
        plan = {p: sliced(acts, slices)
                for p, acts in POSITION_SCHEDULES[name](graph, placement, microbatches).items()}
    else:
        try:
            fn = SCHEDULES[name]
        except KeyError:
            raise ScheduleError(
                f"unknown schedule {name!r}; choose one of {', '.join(NAMES)}") from None
        plan = _plan(fn, graph, microbatches, placement, forward_only=False, slices=slices)
    if batch_w > 1 or name in POSITION_SCHEDULES:
        plan = batch_weights(plan, batch_w)
        simulate(graph, placement, plan, microbatches, slices=slices)
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
    return _plan(forward_only, graph, microbatches, placement, forward_only=True)
