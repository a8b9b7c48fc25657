"""Timelines as text: the simulator's (``hvdtrain plan --schedule S -m M``) and a run's (``--trace``).

Pure: no MPI. :func:`draw` renders the lock-step timeline of a plan (unit costs,
one column per tick, ``.`` idle), its bubble (idle share of positions x ticks)
and each position's peak of stage-microbatches holding activations (from a
forward to its ``W``, or to its ``B`` when the backward is fused).
:func:`draw_trace` renders what a run's ``--trace`` file recorded in its last
step: each rank's actions in the order they ran, and the share of its time
between the first action's start and the last one's end that it spent in none
(its bubble).
"""

from __future__ import annotations

import json
from typing import Any

from ..layout.placement import Placement
from ..parallel.graph import StageGraph
from .actions import Plan
from .simulator import simulate

__all__ = ["draw", "draw_trace", "peak_held"]


def peak_held(acts: list[Any]) -> int:
    """Most stage-microbatches (slices) one list holds activations for at once."""
    split = any(a.kind == "W" for a in acts)
    live = worst = 0
    for a in acts:
        live += a.kind == "F"
        live -= (a.n if a.kind == "W" else 1) if a.kind == ("W" if split else "B") else 0
        worst = max(worst, live)
    return worst


def draw(graph: StageGraph, placement: Placement, plan: Plan, microbatches: int, slices: int = 1) -> str:
    """The plan's timeline in unit ticks (a batched ``W`` one per microbatch it covers, its later ticks
    drawn ``~``), one row per position, then its bubble and peaks."""
    sim = simulate(graph, placement, plan, microbatches, slices=slices)
    ticks, npos = int(round(sim.makespan)), placement.num_positions
    grid = [["."] * ticks for _ in range(npos)]
    for a, end in sim.finish.items():
        if a.kind != "R":
            p, start = placement.position_of(a.stage), int(round(end)) - a.n
            grid[p][start:start + a.n] = [str(a)] + ["~"] * (a.n - 1)
    width = max((len(c) for row in grid for c in row), default=1)
    lines = [f"position {p}: " + " ".join(c.rjust(width) for c in grid[p]) for p in range(npos)]
    work = sum(a.n for p in range(npos) for a in plan.get(p, []) if a.kind != "R")
    idle = ticks * npos - work
    lines.append(f"{ticks} ticks (unit costs); bubble {idle}/{ticks * npos} = {idle / (ticks * npos):.1%} "
                 "of positions x ticks")
    lines.append("peak activations (stage-microbatches held): " + ", ".join(
        f"position {p} {peak_held(plan.get(p, []))}" for p in range(npos)))
    return "\n".join(lines)


def draw_trace(path: str) -> str:
    """A ``--trace`` file as text: per rank, its actions in order and its idle share.

    Raises:
        ValueError: on a file that is not a trace ``--trace`` wrote (one line).
    """
    try:
        with open(path) as f:
            data = json.load(f)
        events = data["traceEvents"] if isinstance(data, dict) else data
        names = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
        spans: dict[Any, list[tuple[float, float, str]]] = {}
        syncs: dict[Any, list[float]] = {}
        for e in events:
            if e.get("ph") == "X" and e.get("cat") in ("F", "B", "W", "R"):
                spans.setdefault(e["pid"], []).append((float(e["ts"]), float(e["dur"]), str(e["name"])))
            elif e.get("ph") == "X" and e.get("cat") == "sync" and e.get("name") == "sync":
                syncs.setdefault(e["pid"], []).append(float(e["ts"]) + float(e["dur"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--trace {path}: not a trace hvdtrain --trace wrote ({type(e).__name__}: {e})") \
            from None
    if not spans:
        raise ValueError(f"--trace {path}: no pipeline actions recorded in it")
    lines = []
    for pid in sorted(spans):
        ends = sorted(syncs.get(pid, []))
        after = ends[-2] if len(ends) >= 2 else float("-inf")  # the last step: after the one before's sync
        acts = sorted(a for a in spans[pid] if a[0] > after)
        t0, t1 = acts[0][0], max(ts + d for ts, d, _ in acts)
        busy = sum(d for _, d, _ in acts)
        idle = 1 - busy / (t1 - t0) if t1 > t0 else 0.0
        lines.append(f"{names.get(pid, pid)}: {' '.join(n for _, _, n in acts)}")
        lines.append(f"    {len(acts)} actions in {(t1 - t0) / 1e3:.1f} ms, idle {idle:.1%}")
    return "\n".join(lines)
