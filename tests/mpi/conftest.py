"""SPMD helpers: every rank runs every test; run under `mpirun -np N python -m mpi4py -m pytest`.

`python -m mpi4py` aborts the whole job when one rank fails, so no rank hangs
waiting for a dead peer. Tests pick layouts that fit the world size and skip
the rest (the same decision on every rank).
"""

from __future__ import annotations

from typing import Any

import pytest

from hvdhybrid.comm.groups import mpi_world


@pytest.fixture(scope="session")
def world() -> Any:
    return mpi_world()


def pytest_runtest_logreport(report: Any) -> None:
    """A test that fails on some ranks only would leave the others waiting in its collectives
    (pytest -x exits without an exception, so ``python -m mpi4py`` does not abort): print the
    failure here, then end every rank at once."""
    if report.failed:
        import sys

        w = mpi_world()
        sys.stderr.write(f"\n[rank {w.Get_rank()}] {report.nodeid} {report.when} failed:\n"
                         f"{report.longreprtext}\n")
        sys.stderr.flush()
        w.Abort(1)


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    from hvdhybrid.comm import horovod_ops

    horovod_ops.shutdown(mpi_world())
