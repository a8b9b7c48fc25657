"""Layout-independent random numbers: draws keyed by (seed, step, what), never by rank or microbatch.

A model that draws random numbers while training (GROVER's dyMPN hop counts,
its masked atoms) must draw the same numbers whether the global batch runs
in one process or is cut into bundles, microbatches, stages and replicas.
So draws are keyed by the run's seed, the optimizer step and a name (a
layer, a molecule's index in the data set) — all of which every layout
agrees on. The trainer sets the step before each optimizer step, and the
executor sets the data rows a stage is about to compute (their indices in
the data set) before each forward; this is the one piece of process-wide
state in the package, and it holds only integers.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Optional, Sequence

import torch

__all__ = ["set_step", "current_step", "set_rows", "current_rows", "snapshot", "restored", "generator",
           "randint"]

_STATE = {"seed": 0, "step": 0}
_ROWS: dict[str, Optional[tuple[int, ...]]] = {"rows": None}


def set_step(seed: int, step: int) -> None:
    """Called by the trainer before every optimizer step (and by references in tests)."""
    _STATE["seed"], _STATE["step"] = int(seed), int(step)


def current_step() -> int:
    return _STATE["step"]


def set_rows(rows: Optional[Sequence[int]]) -> None:
    """The data-set indices of the rows the next forward computes, in order (None: unknown)."""
    _ROWS["rows"] = None if rows is None else tuple(int(r) for r in rows)


def current_rows() -> Optional[tuple[int, ...]]:
    return _ROWS["rows"]


def snapshot() -> tuple[int, int, Optional[tuple[int, ...]]]:
    """The keys of every draw now (seed, step, rows): what a recomputation must draw under again."""
    return _STATE["seed"], _STATE["step"], _ROWS["rows"]


@contextlib.contextmanager
def restored(snap: tuple[int, int, Optional[tuple[int, ...]]]) -> Iterator[None]:
    """Within: draws are keyed as at :func:`snapshot` time; the keys of now come back after."""
    now = snapshot()
    _STATE["seed"], _STATE["step"], _ROWS["rows"] = snap
    try:
        yield
    finally:
        _STATE["seed"], _STATE["step"], _ROWS["rows"] = now


def _key(*names: object) -> int:
    text = "|".join(map(str, (_STATE["seed"], _STATE["step"], *names)))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator(*names: object) -> torch.Generator:
    """A CPU generator seeded by (seed, step, *names)."""
    return torch.Generator().manual_seed(_key(*names))


def randint(low: int, high: int, *names: object) -> int:
    """An integer in ``[low, high]`` drawn by (seed, step, *names)."""
    return low + _key(*names) % (high - low + 1)
