"""SPMD helpers: every rank runs every test; run under `mpirun -np N python -m mpi4py -m pytest`.

`python -m mpi4py` aborts the whole job when one rank fails, so no rank hangs
waiting for a dead peer. Tests pick layouts that fit the world size and skip
the rest (the same decision on every rank).
"""

from __future__ import annotations

from typing import Any

import pytest

from hvdhybrid.groups import mpi_world


@pytest.fixture(scope="session")
def world() -> Any:
    return mpi_world()


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    from hvdhybrid import hvd

    hvd.shutdown(mpi_world())
