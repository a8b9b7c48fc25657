"""User-input checks that every rank agrees on: one line from one rank, exit code 2 on all.

Also the launch check: ``COMM_WORLD`` only once the launcher gave MPI the whole job.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

from ..errors import USER_ERRORS, UserError

__all__ = ["agreed", "world"]


def world() -> Any:
    """``COMM_WORLD``, after checking the launcher gave MPI the whole job."""
    from ..comm.groups import check_launch, mpi_world

    w = mpi_world()
    check_launch(w)
    return w


@contextmanager
def agreed(comm: Any) -> Iterator[None]:
    """Collective over ``comm``: if the block fails on user input on any rank, every rank stops.

    On leaving the block every rank allgathers its :class:`~hvdhybrid.errors.InputError`
    message, or ``None``. If any rank failed, the first failing rank raises :class:`UserError`
    (one line, exit code 2; suffixed ``(on rank R)`` when only some ranks failed) and the
    others exit quietly with code 2, so the user reads one line, not one per rank. Other
    exceptions pass through without the allgather. Names bound in the block are used after it::

        with agreed(w):
            layout = cfg.parallel.layout(w.Get_size())
        groups = ProcessGroups.create(layout, w)

    Raises:
        UserError: on the first failing rank.
        SystemExit: code 2, on every other rank, when some rank failed.
    """
    error: Optional[str] = None
    try:
        yield
    except USER_ERRORS as e:
        error = str(e)
    errors = comm.allgather(error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        first_rank, msg = failed[0]
        if comm.Get_rank() == first_rank:
            some = 1 < comm.Get_size() and len(failed) < comm.Get_size()
            raise UserError(f"{msg} (on rank {first_rank})" if some else msg)
        raise SystemExit(2)
