"""``--trace FILE``: what every rank ran when, as a Chrome trace (Perfetto, chrome://tracing).

Off unless :func:`enable` is called: then the executor records every action
(``1F0``, ``1B0.2``: stage, kind, microbatch, token slice) and the trainer its
gradient sync, guard and optimizer step, as complete events. :func:`write`
gathers every rank's events to rank 0 (a collective) and writes one JSON file
with one track per rank, named by its coordinates. Times are microseconds
from a barrier all ranks passed together.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Iterator, Optional

__all__ = ["enable", "enabled", "span", "write", "events"]

_STATE: dict[str, Any] = {"on": False, "t0": 0.0, "events": []}


def enable(comm: Any) -> None:
    """Start recording on every rank of ``comm`` (a collective: the barrier is the common zero)."""
    comm.Barrier()
    _STATE.update(on=True, t0=time.perf_counter(), events=[])


def enabled() -> bool:
    return bool(_STATE["on"])


@contextlib.contextmanager
def span(name: str, cat: str) -> Iterator[None]:
    """Record the enclosed work as one event (nothing when tracing is off)."""
    if not _STATE["on"]:
        yield
        return
    t = time.perf_counter()
    try:
        yield
    finally:
        end = time.perf_counter()
        _STATE["events"].append((name, cat, (t - _STATE["t0"]) * 1e6, (end - t) * 1e6))


def events() -> list[tuple[str, str, float, float]]:
    """This rank's events so far: (name, category, start us, duration us)."""
    return list(_STATE["events"])


def write(comm: Any, path: str, label: str) -> Optional[int]:
    """Gather every rank's events (collective) and write them to ``path`` on rank 0.

    Args:
        comm: the world communicator.
        path: the Chrome trace file to write.
        label: this rank's track name, e.g. ``rank 1 | bundle 0 | stage 1``.

    Returns:
        On rank 0, the number of events written; elsewhere ``None``.
    """
    got = comm.gather((comm.Get_rank(), label, events()), root=0)
    _STATE["on"] = False
    if comm.Get_rank() != 0:
        return None
    out: list[dict[str, Any]] = []
    for rank, name, evs in got:
        out.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": name}})
        out.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0,
                    "args": {"sort_index": rank}})
        out += [{"name": n, "cat": c, "ph": "X", "ts": round(ts, 1), "dur": round(d, 1), "pid": rank,
                 "tid": 0} for n, c, ts, d in evs]
    with open(path, "w") as f:
        json.dump({"traceEvents": out, "displayTimeUnit": "ms"}, f)
    return sum(1 for e in out if e["ph"] == "X")
