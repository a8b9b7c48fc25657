"""Schedules written per position over virtual stages: interleaved 1F1B, ZB-V and V-Half.

A position (stage group) that runs several model stages (*virtual stages*,
``--stages-per-rank V``) needs one order over all of them. These schedules give
it directly, as data (one action list per position), and
:func:`~hvdhybrid.pipeline.simulator.simulate` proves each plan as it proves the
per-stage ones. They need a chain of stages. Drawings: unit costs, 2 positions,
4 stages, 4 microbatches.

Interleaved 1F1B (``interleaved``; Narayanan et al. 2021, Megatron's order):
looped placement, stage ``c*P + r`` on position ``r`` (its chunk ``c``). Each
position runs forwards in groups of ``P`` microbatches, chunk by chunk (chunk 0
of microbatches 0..P-1, then chunk 1 of the same, ...), backwards in the same
groups with the chunks reversed, and warms up with ``2(P-1-r) + (V-1)P``
forwards before it alternates (more when a last group of fewer than ``P``
microbatches needs it: the fewest the simulator proves deadlock-free). With
unit costs and ``P`` dividing ``M`` a step takes ``2VM + 2(P-1)`` ticks: a
bubble of ``(P-1)/(VM)`` of the work, where 1F1B on one stage per position
has ``(P-1)/M``::

    position 0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1   . 2B2   . 2B3 0B2 0B3
    position 1:   . 1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3   .

ZB-V (``zbv``; Qi et al., *Pipeline Parallelism with Controllable Memory*,
2024): two stages per position in a V, stage ``s`` on position ``s`` for ``s <
P`` and ``2P-1-s`` after (``--placement v``, which ``auto`` picks): position 0
holds the first and the last stage. ``W`` is split off. Built by list
scheduling in lock-step unit ticks: each tick a position runs a ready ``B``,
else a ready ``F`` while fewer than ``cap`` stage-microbatches hold
activations (from their ``F`` to their ``W``), else a pending ``W``; the tie
rules (which stage's ``B`` or ``F`` first, room kept for the V's second leg,
``W`` early at the cap) are searched over :data:`_RULES` and the shortest kept.
ZB-V's cap is ``2P`` stage-microbatches (``P`` whole ones, 1F1B's), and for
``M >= 2P`` (tested for ``P`` = 2, 3, 4) it takes ``6M + P - 1`` ticks: each
position's ``6M`` units of work plus the ``P - 1`` the last position waits for
its first input, the least any schedule can take (25 ticks here; ``hvdtrain
plan --schedule zbv --stages-per-rank 2 -m 4`` draws it).

V-Half (``vhalf``) is the same construction with the cap at ``P + 1``
stage-microbatches: ``(P+1)/(2P)`` of 1F1B's activations (3/4 at 2 positions,
5/8 at 4, towards 1/2), for a longer step (30 ticks here; 8 microbatches on 4
positions: 58 against ZB-V's 51).
"""

from __future__ import annotations

from typing import Callable, Optional

from ..layout.placement import Placement, PlacementError
from ..parallel.graph import StageGraph
from .actions import Action, Plan, ScheduleError
from .simulator import simulate

__all__ = ["POSITION_SCHEDULES", "V_SCHEDULES", "interleaved", "zbv", "vhalf", "v_placement", "v_cap"]

V_SCHEDULES = ("zbv", "vhalf")
"""The schedules that need two stages per position in a V (``--placement auto`` picks ``v`` for them)."""

PositionSchedule = Callable[[StageGraph, Placement, int], Plan]


def _need_chain(graph: StageGraph, name: str) -> None:
    if not graph.is_chain():
        raise ScheduleError(f"--schedule {name} orders a chain of stages, and this model's stages branch "
                            "(task parallelism); use 1f1b, gpipe or zb1")


def interleaved(graph: StageGraph, placement: Placement, microbatches: int) -> Plan:
    """Interleaved 1F1B over looped virtual stages (Megatron's order).

    Args:
        graph: a chain of ``V * P`` stages.
        placement: looped: stage ``s`` on position ``s % P``.
        microbatches: microbatches per step, at least 1.

    Returns:
        Position -> ordered action list (fused backwards).

    Raises:
        ScheduleError: on a graph that is not a chain or a placement that is not looped.
    """
    _need_chain(graph, "interleaved")
    p, n = placement.num_positions, graph.num_stages
    if placement != Placement.looped(n, p) or n % p:
        raise ScheduleError(f"--schedule interleaved runs virtual stages placed looped (stage s on stage "
                            f"group s % {p}) with the same number on every group; got placement "
                            f"{list(placement.positions)}; use --placement looped and --stages-per-rank V")
    v, m = n // p, microbatches

    def order(chunks: list[int]) -> list[tuple[int, int]]:
        """(chunk, microbatch) in groups of P microbatches, each group through ``chunks`` in turn."""
        out = []
        for g in range(0, m, p):
            for c in chunks:
                out += [(c, mb) for mb in range(g, min(g + p, m))]
        return out

    fwd_order, bwd_order = order(list(range(v))), order(list(reversed(range(v))))

    def lists(extra: int) -> Plan:
        plan: Plan = {}
        for r in range(p):
            fwd = [Action(c * p + r, "F", mb) for c, mb in fwd_order]
            bwd = [Action(c * p + r, "B", mb) for c, mb in bwd_order]
            warm = min(2 * (p - 1 - r) + (v - 1) * p + extra, len(fwd))
            acts = fwd[:warm]
            for i in range(len(fwd) - warm):
                acts += [fwd[warm + i], bwd[i]]
            plan[r] = acts + bwd[len(fwd) - warm:]
        return plan

    # Megatron's warm-up suffices when P divides M; a last, smaller group can need more forwards first
    for extra in range(v * m + 1):
        plan = lists(extra)
        try:
            simulate(graph, placement, plan, m)
            return plan
        except ScheduleError:
            continue
    raise AssertionError("unreachable: with every forward first the plan is GPipe's order")


def v_placement(num_stages: int, num_positions: int) -> Placement:
    """The V (:meth:`Placement.v`), its error as a :class:`ScheduleError`."""
    try:
        return Placement.v(num_stages, num_positions)
    except PlacementError as e:
        raise ScheduleError(str(e)) from None


def v_cap(name: str, num_positions: int) -> int:
    """Most stage-microbatches holding activations on a position: ZB-V 2P (1F1B's), V-Half P + 1."""
    return 2 * num_positions if name == "zbv" else num_positions + 1


_RULES = [(f, reserve, b, w) for f in ("later", "earlier", "oldest") for reserve in (0, 1, 2)
          for b in ("later", "earlier", "oldest") for w in (False, True)]
_KEYS: dict[str, Callable[[Action], tuple[int, ...]]] = {
    "later": lambda a: (-a.stage,), "earlier": lambda a: (a.stage,), "oldest": lambda a: (a.mb, -a.stage)}


def _v_lists(graph: StageGraph, placement: Placement, m: int, cap: int,
             rule: tuple[str, int, str, bool]) -> Optional[tuple[int, Plan]]:
    """One list scheduling of the V in lock-step unit ticks: (ticks, plan), or None where it gets stuck.

    Each tick a position runs: a pending ``W`` first if ``rule[3]`` and its activations are one short
    of ``cap`` with no ``B`` ready; else a ready ``B`` (picked by ``rule[2]``); else a ready ``F`` while
    fewer than ``cap`` stage-microbatches hold activations (``rule[1]`` of them kept free for the second
    leg of the V; picked by ``rule[0]``); else the oldest pending ``W``."""
    fkey, reserve, bkey, w_first = _KEYS[rule[0]], rule[1], _KEYS[rule[2]], rule[3]
    p, n = placement.num_positions, graph.num_stages
    done: set[Action] = set()
    next_f = {s: 0 for s in range(n)}
    next_b = dict(next_f)
    pending_w: dict[int, list[Action]] = {r: [] for r in range(p)}
    held = {r: 0 for r in range(p)}
    plan: Plan = {r: [] for r in range(p)}
    tick = 0
    while len(done) < 3 * m * n:
        tick += 1
        ran = []
        for r in range(p):
            mine = placement.stages_on(r)
            bs = [Action(s, "B", next_b[s]) for s in mine if next_b[s] < next_f[s]
                  and (s == n - 1 or Action(s + 1, "B", next_b[s]) in done)]
            fs = [Action(s, "F", next_f[s]) for s in mine if next_f[s] < m
                  and (s == 0 or Action(s - 1, "F", next_f[s]) in done)
                  and held[r] < cap - (reserve if s < p else 0)]
            if w_first and pending_w[r] and held[r] >= cap - 1 and not bs:
                a = pending_w[r].pop(0)
            elif bs:
                a = min(bs, key=bkey)
            elif fs:
                a = min(fs, key=fkey)
            elif pending_w[r]:
                a = pending_w[r].pop(0)
            else:
                continue
            ran.append((r, a))
        if not ran:
            return None
        for r, a in ran:
            plan[r].append(a)
            done.add(a)
            if a.kind == "F":
                next_f[a.stage] += 1
                held[r] += 1
            elif a.kind == "B":
                next_b[a.stage] += 1
                pending_w[r].append(Action(a.stage, "W", a.mb))
            else:
                held[r] -= 1
    return tick, plan


def _v(name: str, graph: StageGraph, placement: Placement, microbatches: int) -> Plan:
    """The shortest (unit costs) of the list schedulings :data:`_RULES` give; the first on ties
    (:func:`~hvdhybrid.pipeline.schedules.build` then proves it with the simulator)."""
    _need_chain(graph, name)
    p = placement.num_positions
    if placement != v_placement(graph.num_stages, p):
        raise ScheduleError(f"--schedule {name} runs two stages per stage group in a V (stage s on group s, "
                            f"then back); got placement {list(placement.positions)}; use --placement v")
    best: Optional[tuple[int, Plan]] = None
    for rule in _RULES:
        got = _v_lists(graph, placement, microbatches, v_cap(name, p), rule)
        if got is not None and (best is None or got[0] < best[0]):
            best = got
    if best is None:  # not met in the sizes tested (1..4P microbatches, 2..8 groups)
        raise ScheduleError(f"--schedule {name}: no order found for {microbatches} microbatches on {p} stage "
                            "groups; use more microbatches or --schedule zb1")
    return best[1]


def zbv(graph: StageGraph, placement: Placement, microbatches: int) -> Plan:
    """ZB-V: two stages per position in a V, ``W`` split off, zero bubble at 1F1B's activation memory."""
    return _v("zbv", graph, placement, microbatches)


def vhalf(graph: StageGraph, placement: Placement, microbatches: int) -> Plan:
    """V-Half: ZB-V's order with activations capped at about half of 1F1B's."""
    return _v("vhalf", graph, placement, microbatches)


POSITION_SCHEDULES: dict[str, PositionSchedule] = {
    "interleaved": interleaved,
    "zbv": zbv,
    "vhalf": vhalf,
}
"""Training schedules written per position: ``name -> (graph, placement, microbatches) -> plan``."""
