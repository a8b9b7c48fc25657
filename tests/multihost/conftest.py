"""Fixtures for multi-host tests on emulated hosts (network namespaces on this machine).

Tests here need root, iproute2 and util-linux; elsewhere they skip, naming why.
Run them with ``pytest tests/multihost`` (pytest's default testpaths cover tests/unit only).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from hvdhybrid.testing.netemu import EmulatedHosts, unavailable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def emulation() -> None:
    """Skip unless this machine can emulate hosts."""
    why = unavailable()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="session")
def hosts2(emulation: None) -> Iterator[EmulatedHosts]:
    """Two emulated hosts h0, h1 with 2 slots each and 1 Gbit/s links."""
    with EmulatedHosts(2, slots=2, rate="1gbit") as hosts:
        yield hosts


@pytest.fixture
def env2(hosts2: EmulatedHosts) -> dict[str, str]:
    """Launch environment for ``hosts2``: one thread per rank and this repo on PYTHONPATH."""
    env = hosts2.env()
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p))
    return env
