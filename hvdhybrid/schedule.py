"""Pipeline schedules as data: per-stage action lists, and a simulator that proves them.

An action is ``F`` (forward of one microbatch) or ``B`` (its backward) and
prints as ``F3`` / ``B3``. Sends and receives are implied by the stage graph:
before ``F m`` a stage waits for the activations of ``m`` from its upstream
stages; after it, it sends its output downstream without blocking (``Isend``).
``B m`` waits for the output gradients of ``m`` from downstream and sends
input gradients upstream. Every replica of a stage runs the same list.

GPipe (fill-drain), 2 stages, 4 microbatches::

    stage 0: F0 F1 F2 F3          B0 B1 B2 B3      (B in order: 1F1B-compatible)
    stage 1:    F0 F1 F2 F3 B0 B1 B2 B3

1F1B: a stage runs ``depth`` warm-up forwards (its distance to the sink), then
alternates one forward and one backward, then drains, so at most ``depth+1``
microbatches of activations are alive at a time instead of all of them::

    stage 0: F0 F1 B0 F2 B1 F3 B2 B3
    stage 1: F0 B0 F1 B1 F2 B2 F3 B3
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import InputError
from .graph import StageGraph

__all__ = ["Action", "ScheduleError", "SCHEDULES", "gpipe", "one_f_one_b",
           "forward_only", "build", "simulate"]


@dataclass(frozen=True)
class Action:
    kind: str  # "F" or "B"
    mb: int

    def __str__(self) -> str:
        return f"{self.kind}{self.mb}"


class ScheduleError(InputError):
    """An unknown schedule name, or a schedule the simulator proves incomplete or deadlocked."""


def gpipe(graph: StageGraph, stage: int, microbatches: int) -> list[Action]:
    """All forwards, then all backwards (in the same microbatch order)."""
    return ([Action("F", m) for m in range(microbatches)]
            + [Action("B", m) for m in range(microbatches)])


def one_f_one_b(graph: StageGraph, stage: int, microbatches: int) -> list[Action]:
    """Warm up with ``depth(stage)`` forwards, then one forward / one backward, then drain."""
    warmup = min(graph.depth(stage), microbatches)
    out = [Action("F", m) for m in range(warmup)]
    for i in range(microbatches - warmup):
        out += [Action("F", warmup + i), Action("B", i)]
    out += [Action("B", m) for m in range(microbatches - warmup, microbatches)]
    return out


def forward_only(graph: StageGraph, stage: int, microbatches: int) -> list[Action]:
    """Evaluation: forwards only."""
    return [Action("F", m) for m in range(microbatches)]


SCHEDULES: dict[str, Callable[[StageGraph, int, int], list[Action]]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
}


def build(name: str, graph: StageGraph, microbatches: int) -> dict[int, list[Action]]:
    """Action lists of every stage for schedule ``name``, checked by :func:`simulate`."""
    try:
        fn = SCHEDULES[name]
    except KeyError:
        raise ScheduleError(
            f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None
    plan = {s: fn(graph, s, microbatches) for s in range(graph.num_stages)}
    simulate(graph, plan, microbatches)
    return plan


def simulate(graph: StageGraph, plan: dict[int, list[Action]], microbatches: int,
             forward_only: bool = False) -> list[list[str]]:
    """Run the action lists in lock-step ticks; prove they finish without deadlock.

    A stage's next action runs in a tick when its dependencies ran in an
    earlier tick: ``F m`` needs ``F m`` of every upstream stage; ``B m`` needs
    its own ``F m`` and ``B m`` of every downstream stage. Since sends never
    block, this is exactly when the executor could run it.

    Returns:
        One row per tick: what each stage ran (``""`` when idle); its length is
        the makespan in action units, for bubble estimates and drawings.

    Raises:
        ScheduleError: on a missing/duplicate action or a deadlock, naming the
            stuck stages and what each waits for.
    """
    want = {Action("F", m) for m in range(microbatches)}
    if not forward_only:
        want |= {Action("B", m) for m in range(microbatches)}
    for s in range(graph.num_stages):
        acts = plan.get(s, [])
        if len(acts) != len(set(acts)) or set(acts) != want:
            raise ScheduleError(f"stage {s}: actions {list(map(str, acts))} are not each "
                                f"F and B of microbatches 0..{microbatches - 1} exactly once")
    done: set[tuple[int, Action]] = set()
    pos = {s: 0 for s in range(graph.num_stages)}
    timeline: list[list[str]] = []

    def ready(s: int, a: Action) -> bool:
        if a.kind == "F":
            return all((u, a) in done for u in graph.upstream(s))
        return (s, Action("F", a.mb)) in done and all(
            (d, a) in done for d in graph.downstream(s))

    while any(pos[s] < len(plan[s]) for s in pos):
        ran = []
        for s in pos:
            if pos[s] < len(plan[s]) and ready(s, plan[s][pos[s]]):
                ran.append((s, plan[s][pos[s]]))
        if not ran:
            stuck = ", ".join(f"stage {s} at {plan[s][pos[s]]}" for s in pos
                              if pos[s] < len(plan[s]))
            raise ScheduleError(f"schedule deadlocks: {stuck} wait for each other")
        row = [""] * graph.num_stages
        for s, a in ran:
            done.add((s, a))
            pos[s] += 1
            row[s] = str(a)
        timeline.append(row)
    return timeline
