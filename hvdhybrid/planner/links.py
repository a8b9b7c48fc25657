"""Point-to-point latency and bandwidth between two ranks, measured with mpirun (what the planner's
transfer and collective times stand on).

``python -m hvdhybrid.planner.links`` under ``mpirun -np 2``: rank 0 and 1 ping-pong 8 bytes and 4 MB
(mpi4py buffers, a warm-up then the median of 9 round trips) and rank 0 prints ``{"latency": s,
"bandwidth": bytes/s}``. :func:`measure` runs it (inside one host, or with a hostfile one rank per
host, across the link between them) and keeps the answer in ``~/.cache/hvdhybrid/links``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

from ..errors import InputError

__all__ = ["Link", "LinkError", "measure"]

SIZES = (8, 4 << 20)


class LinkError(InputError):
    """The link could not be measured (mpirun failed, or a hostfile without two usable hosts)."""


@dataclass(frozen=True)
class Link:
    """A link's one-way time for ``n`` bytes: ``latency + n / bandwidth``."""

    latency: float
    bandwidth: float

    def time(self, n: float) -> float:
        return self.latency + n / self.bandwidth if n > 0 else 0.0

    def allreduce(self, n: float, ranks: int) -> float:
        """A ring all-reduce of ``n`` bytes over ``ranks``: 2 (r-1) steps of n / r bytes."""
        if ranks <= 1 or n <= 0:
            return 0.0
        return 2 * (ranks - 1) * self.time(n / ranks)

    def allgather(self, n: float, ranks: int) -> float:
        """A ring all-gather (or reduce-scatter) of ``n`` bytes in all: r-1 steps of n / r bytes."""
        return (ranks - 1) * self.time(n / ranks) if ranks > 1 and n > 0 else 0.0


def _main() -> None:
    import time

    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    r = comm.Get_rank()
    out = {}
    for n in SIZES:
        buf = np.zeros(n, dtype=np.uint8)
        times = []
        for rep in range(10):
            comm.Barrier()
            t0 = time.perf_counter()
            if r == 0:
                comm.Send(buf, dest=1)
                comm.Recv(buf, source=1)
            elif r == 1:
                comm.Recv(buf, source=0)
                comm.Send(buf, dest=0)
            if rep:
                times.append((time.perf_counter() - t0) / 2)
        out[n] = sorted(times)[len(times) // 2]
    if r == 0:
        small, big = out[SIZES[0]], out[SIZES[1]]
        print(json.dumps({"latency": small, "bandwidth": (SIZES[1] - SIZES[0]) / max(big - small, 1e-9)}))


def measure(hostfile: Optional[str] = None, cache: Optional[str] = None, timeout: float = 120.0) -> Link:
    """The link inside this host (``hostfile`` None) or between the hostfile's first two hosts.

    Raises:
        LinkError: mpirun failed or printed no answer (one line, with its last words).
    """
    cache = cache or os.path.join(os.path.expanduser("~"), ".cache", "hvdhybrid", "links")
    key = "local" if hostfile is None else hashlib.sha1(open(hostfile, "rb").read()).hexdigest()[:12]
    path = os.path.join(cache, f"{os.uname().nodename}-{key}.json")
    if os.path.exists(path):
        got = json.load(open(path))
        return Link(got["latency"], got["bandwidth"])
    cmd = ["mpirun", "-np", "2", "--oversubscribe"]
    if hostfile is not None:
        cmd += ["--hostfile", hostfile, "--map-by", "node"]
    cmd += ["-x", "PYTHONPATH", sys.executable, "-m", "hvdhybrid.planner.links"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LinkError(f"measuring the link with mpirun failed ({e}); check that mpirun runs here") from None
    line = next((x for x in res.stdout.splitlines() if x.startswith("{")), None)
    if res.returncode or line is None:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise LinkError(f"measuring the link with {' '.join(cmd[:6])} ... failed: {last}")
    got = json.loads(line)
    os.makedirs(cache, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(got, f)
    os.replace(path + ".tmp", path)
    return Link(got["latency"], got["bandwidth"])


if __name__ == "__main__":
    _main()
