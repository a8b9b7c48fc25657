"""The schedule language: actions, plans, the one dependency rule, and what a complete plan is.

An action is ``F`` (forward of one microbatch), ``B`` (its backward) or ``W``
(the weight gradient, when split from ``B``) on one model stage, printed as
``2F0`` (stage 2, forward, microbatch 0) as torch.distributed.pipelining does.
``R`` (printed ``2R0``, microbatch 0 by convention) starts the stage's gradient
average across bundles; it follows every other action of its stage in the
position's list, and the position goes on while it is on the wire
(:func:`~hvdhybrid.pipeline.schedules.with_reduce`). A batched ``W`` computes the weight
gradients of ``n`` consecutive microbatches as one product (printed ``2W0-3``: microbatches 0 to 3;
:func:`~hvdhybrid.pipeline.schedules.batch_weights`). A :data:`Plan` holds one
ordered list per position (stage group). Pure: no MPI.

Token slices (TeraPipe): when each sequence is cut into ``S`` slices along the
token axis, an action also names its slice, printed ``2F0.3`` (slice 3 of
microbatch 0; slice 0 prints as before). Slice ``i`` of a stage attends to the
keys and values its own stage kept for slices ``0 .. i-1`` of the same
sequence, so its ``F`` waits for the stage's ``F`` of slice ``i-1``; its ``B``
needs the gradients that later slices left on those keys and values, so it
waits for the stage's ``B`` of slice ``i+1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError
from ..layout.placement import Placement, PlacementError
from ..parallel.graph import StageGraph

__all__ = ["Action", "Plan", "ScheduleError", "depends_on", "check_placement", "check_complete", "stuck"]


class ScheduleError(InputError):
    """An unknown schedule name, or a plan the simulator proves incomplete, misplaced or deadlocked."""


_ACTION = re.compile(r"(\d+)([FBWR])(\d+)(?:-(\d+))?(?:\.(\d+))?")


@dataclass(frozen=True, order=True)
class Action:
    """One unit of pipeline work: ``kind`` (``F``, ``B`` or ``W``) of microbatch ``mb`` on ``stage``.

    Raises:
        ScheduleError: if ``kind`` is not ``F``, ``B``, ``W`` or ``R``.
    """

    stage: int
    kind: str  # "F" forward, "B" backward (input grad; fused with W when the plan has no W), "W" weight
    # grad, "R" the stage's gradient reduce across bundles
    mb: int
    slice: int = 0  # the token slice of the microbatch's sequences (0 when they are not sliced)
    n: int = 1  # microbatches mb .. mb+n-1: more than one only for a batched W

    def __post_init__(self) -> None:
        if self.kind not in ("F", "B", "W", "R"):
            raise ScheduleError(f"action kind must be 'F', 'B', 'W' or 'R', got {self.kind!r}")
        if self.n < 1 or (self.n > 1 and self.kind != "W"):
            raise ScheduleError(f"only a W spans several microbatches, got {self.kind} of {self.n}")

    @property
    def mbs(self) -> range:
        """The microbatches this action covers (one, except for a batched ``W``)."""
        return range(self.mb, self.mb + self.n)

    def __str__(self) -> str:
        span = f"-{self.mb + self.n - 1}" if self.n > 1 else ""
        return f"{self.stage}{self.kind}{self.mb}{span}" + (f".{self.slice}" if self.slice else "")

    @classmethod
    def parse(cls, text: str) -> Action:
        """The inverse of ``str``: ``"2F0"`` -> ``Action(2, "F", 0)``.

        Args:
            text: stage number, one of ``F``/``B``/``W``/``R``, microbatch number, for a batched
                ``W`` ``-`` and its last microbatch (``"2W0-3"``), and optionally ``.`` and the token
                slice (``"2B0.3"``).

        Returns:
            The action.

        Raises:
            ScheduleError: if ``text`` is not of that form.
        """
        m = _ACTION.fullmatch(text.strip())
        if not m:
            raise ScheduleError(
                f"cannot read action {text!r}: write stage, F/B/W/R and microbatch, e.g. '2F0' "
                "(or '2F0.3' for token slice 3, '2W0-3' for the weight gradients of microbatches 0 to 3)")
        first = int(m.group(3))
        last = first if m.group(4) is None else int(m.group(4))
        if last < first:
            raise ScheduleError(f"cannot read action {text!r}: the span {first}-{last} runs backwards")
        return cls(int(m.group(1)), m.group(2), first, int(m.group(5) or 0), last - first + 1)


Plan = dict[int, list[Action]]
"""Position -> that position's ordered action list."""

def depends_on(graph: StageGraph, a: Action, slices: int = 1) -> list[Action]:
    """What ``a`` waits for: the whole dependency rule of every schedule, in one place.

    ``slices`` is the number of token slices per sequence (1: not sliced).
    """
    m, i = a.mb, a.slice
    if a.kind == "R":  # after its own stage's actions by list order (check_complete); nothing remote
        return []
    if a.kind == "F":
        own = [Action(a.stage, "F", m, i - 1)] if i > 0 else []
        return [Action(u, "F", m, i) for u in graph.upstream(a.stage)] + own
    if a.kind == "B":
        own = [Action(a.stage, "B", m, i + 1)] if i + 1 < slices else []
        return ([Action(a.stage, "F", m, i)] + [Action(d, "B", m, i) for d in graph.downstream(a.stage)]
                + own)
    return [Action(a.stage, "B", j, i) for j in a.mbs]


def check_placement(graph: StageGraph, placement: Placement) -> None:
    """The placement places exactly the graph's stages.

    Raises:
        PlacementError: naming both counts.
    """
    if placement.num_stages != graph.num_stages:
        raise PlacementError(
            f"placement {list(placement.positions)} covers {placement.num_stages} stages but the "
            f"stage graph has {graph.num_stages}; give one position per stage")


def check_complete(graph: StageGraph, by_stage: dict[int, list[Action]], microbatches: int,
                    forward_only: bool, slices: int = 1) -> None:
    """Each stage runs F (and B) of every microbatch (and slice) exactly once, and W for all or none;
    R, if any, once, after all of them."""
    units = [(m, i) for m in range(microbatches) for i in range(slices)]
    sl = f" and slices 0..{slices - 1}" if slices > 1 else ""
    for s in range(graph.num_stages):
        acts = by_stage.get(s, [])
        reduce = [k for k, a in enumerate(acts) if a.kind == "R"]
        if reduce and (forward_only or reduce != [len(acts) - 1] or acts[-1] != Action(s, "R", 0)):
            raise ScheduleError(f"stage {s}: a reduce must be the stage's last action, once, as {s}R0, and "
                                f"only in training; got {' '.join(map(str, acts))}")
        acts = acts[:-1] if reduce else acts
        acts = [Action(a.stage, a.kind, j, a.slice) for a in acts for j in a.mbs]  # a batched W: each
        got = set(acts)
        want = {Action(s, "F", m, i) for m, i in units}
        if not forward_only:
            want |= {Action(s, "B", m, i) for m, i in units}
            ws = {Action(s, "W", m, i) for m, i in units}
            if got & ws:
                want |= ws
        if len(acts) != len(got) or got != want:
            need = "F" if forward_only else "F and B (and W for all or none)"
            raise ScheduleError(
                f"stage {s}: actions {' '.join(map(str, acts)) or '(none)'} are not each {need} of "
                f"microbatches 0..{microbatches - 1}{sl} exactly once")


def stuck(graph: StageGraph, placement: Placement, heads: dict[int, list[Action]],
           done: set[Action], slices: int = 1) -> str:
    """'position 0 at 0B0 waits for 1B0 (on position 1); ...' for a deadlock report."""
    parts = []
    for p, acts in sorted(heads.items()):
        for a in acts:
            waits = [f"{d} (later on position {p} itself)" if placement.position_of(d.stage) == p
                     else f"{d} (on position {placement.position_of(d.stage)})"
                     for d in depends_on(graph, a, slices) if d not in done]
            parts.append(f"position {p} at {a} waits for {', '.join(waits)}")
    return "; ".join(parts)
