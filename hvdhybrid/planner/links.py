"""Point-to-point latency and bandwidth between two ranks, measured with mpirun (what the planner's
transfer and collective times stand on).

``python -m hvdhybrid.planner.links`` under ``mpirun -np N``: rank 0 and its first neighbour on the
same host ping-pong 8 bytes and 4 MB (mpi4py buffers, a warm-up then the median of 9 round trips), so
do rank 0 and the first rank on another host if there is one, and all N ranks all-reduce 64 bytes
and 16 MB; rank 0 prints ``{"latency": s, "bandwidth": bytes/s, "remote_latency", "remote_bandwidth",
"ar_latency", "ar_bandwidth", "hosts": [host of each rank]}`` (the all-reduce fitted to a ring's
per-step link). :func:`measure` runs it with the ranks placed as a run
places them (with a hostfile, across its hosts) and keeps the answer in ``~/.cache/hvdhybrid/links``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import InputError

__all__ = ["Link", "LinkError", "Network", "crowding", "links", "measure", "network", "probe", "remote_link",
           "sleep_barrier"]

SIZES = (8, 4 << 20)
BUSY_S = 0.3
AR_SIZES = (64, 16 << 20)
REPS = 25  # forward and backward passes per timing of the crowd (about 0.1 s alone)


class LinkError(InputError):
    """The link could not be measured (mpirun failed, or a hostfile without two usable hosts)."""


@dataclass(frozen=True)
class Link:
    """A link's one-way time for ``n`` bytes: ``latency + n / bandwidth``; ``wake``: what a message to a
    rank that waits while others compute costs on top (it is woken only when a core comes free)."""

    latency: float
    bandwidth: float
    wake: float = 0.0

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


def probe(comm: Any) -> Optional[dict[str, Any]]:
    """Collective over ``comm`` (at least 2 ranks): rank 0 ping-pongs with a rank on its host and one on
    another, all ranks all-reduce; the figures on rank 0 (None elsewhere), as :func:`links` takes them."""
    import time

    import numpy as np
    from mpi4py import MPI

    r = comm.Get_rank()
    names = comm.allgather(MPI.Get_processor_name())
    # ranks 0 and 1 (a run's neighbours; inside a host unless each host has one slot), and rank 0 with
    # the first rank on another host
    near = next((k for k in range(1, len(names)) if names[k] == names[0]), None)
    far = next((k for k in range(1, len(names)) if names[k] != names[0]), None)
    out = _ping_pong(comm, near if near is not None else 1)
    remote = _ping_pong(comm, far) if far is not None and near is not None else {}
    size = comm.Get_size()
    busy = _busy(comm, near if near is not None else 1) if size > 2 else 0.0
    remote_busy = _busy(comm, far) if size > 2 and remote and far is not None else 0.0
    crowd = _crowd(comm, names)
    ar = {}
    for n in AR_SIZES:  # all ranks: MPI's all-reduce, as the average across bundles runs it
        buf = np.zeros(n // 4, dtype=np.float32)
        times = []
        for rep in range(6):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            if rep:
                times.append(time.perf_counter() - t0)
        ar[n] = comm.allreduce(sorted(times)[len(times) // 2], op=MPI.MAX)
    if r == 0:
        small, big = out[SIZES[0]], out[SIZES[1]]
        got = {"latency": small, "bandwidth": (SIZES[1] - SIZES[0]) / max(big - small, 1e-9),
               "busy_latency": busy, "hosts": names, **crowd}
        if remote:
            small, big = remote[SIZES[0]], remote[SIZES[1]]
            got.update(remote_latency=small, remote_bandwidth=(SIZES[1] - SIZES[0]) / max(big - small, 1e-9),
                       remote_busy_latency=remote_busy)
        if size > 1:  # fitted to a ring: 2 (r-1) steps of n / r bytes
            steps = 2 * (size - 1)
            span = max(ar[AR_SIZES[1]] - ar[AR_SIZES[0]], 1e-9)
            got.update(ar_latency=ar[AR_SIZES[0]] / steps,
                       ar_bandwidth=steps * (AR_SIZES[1] - AR_SIZES[0]) / size / span)
        return got
    return None


def _busy(comm: Any, peer: int) -> float:
    """Collective: the one-way latency between rank 0 and ``peer`` while every other rank computes, as
    they do in a run (on a host with fewer cores than ranks, a waiting rank is woken only when a core
    comes free); on rank 0 (0 elsewhere)."""
    import time

    import numpy as np

    r, busy = comm.Get_rank(), 0.0
    comm.Barrier()
    t0, trips, flag = time.perf_counter(), 0, np.zeros(1, dtype=np.uint8)
    if r == 0:  # rank 0 decides when to stop: 0 is a ping, 1 the end
        while time.perf_counter() - t0 < BUSY_S:
            comm.Send(flag, dest=peer)
            comm.Recv(flag, source=peer)
            trips += 1
        busy = (time.perf_counter() - t0) / max(1, 2 * trips)
        comm.Send(np.ones(1, dtype=np.uint8), dest=peer)
    elif r == peer:
        while True:
            comm.Recv(flag, source=0)
            if flag[0]:
                break
            comm.Send(flag, dest=0)
    else:
        x = np.ones(1 << 16)
        while time.perf_counter() - t0 < BUSY_S * 1.2:
            x = x * 1.0000001
    return busy


def _crowd(comm: Any, names: list[str]) -> dict[str, float]:
    """Collective: how much slower a stage-sized forward and backward runs on rank 0 when every rank of
    its host computes at once than alone (the others asleep), with the host's cores (the union of its
    ranks' affinities). Ranks sharing cores evenly would make it (ranks / cores); caches and memory
    bandwidth shared by more working sets than fit make it more."""
    import statistics
    import time

    import torch

    from ..training.device import rank_threads

    torch.set_num_threads(rank_threads())
    g = torch.Generator().manual_seed(0)
    layers = [torch.nn.Linear(1024, 1024) for _ in range(4)]  # 16 MB of weights, as a stage holds
    x = torch.randn(16, 1024, generator=g)

    def work() -> float:
        t0 = time.perf_counter()
        for _ in range(REPS):
            y = x
            for lay in layers:
                y = torch.relu(lay(y))
            y.sum().backward()
        return time.perf_counter() - t0

    r = comm.Get_rank()
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    mine = [c for k, c in enumerate(comm.allgather(sorted(cores))) if names[k] == names[0]]
    work()
    alone, together = [], []
    for _ in range(5):
        comm.Barrier()
        if r == 0:
            alone.append(work())
        sleep_barrier(comm)
        comm.Barrier()
        t0 = time.perf_counter()
        work()
        sleep_barrier(comm)  # until the last rank is done: the host's throughput, not rank 0's luck
        together.append(time.perf_counter() - t0)
    if r != 0:
        return {}
    return {"crowd_ratio": statistics.median(together) / max(statistics.median(alone), 1e-9),
            "host_ranks": float(len(mine)),
            "host_cores": float(len(set().union(*map(set, mine))))}


def sleep_barrier(comm: Any) -> None:
    """A barrier that sleeps instead of spinning (the ranks that wait must leave rank 0 its core)."""
    import time

    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.005)


def crowding(got: dict[str, Any]) -> float:
    """What a host whose ranks all compute at once costs beyond sharing its cores evenly (at least 1):
    :func:`probe`'s measured slowdown over ranks / cores on rank 0's host."""
    ranks, cores = float(got.get("host_ranks", 1.0)), float(got.get("host_cores", 1.0))
    return max(1.0, float(got.get("crowd_ratio", 1.0)) / max(1.0, ranks / max(1.0, cores)))


def _ping_pong(comm: Any, peer: int) -> dict[int, float]:
    """Collective: rank 0 and ``peer`` ping-pong each of :data:`SIZES` (one-way seconds on rank 0)."""
    import time

    import numpy as np

    r, out = comm.Get_rank(), {}
    for n in SIZES:
        buf = np.zeros(n, dtype=np.uint8)
        times = []
        for rep in range(10):
            comm.Barrier()
            t0 = time.perf_counter()
            if r == 0:
                comm.Send(buf, dest=peer)
                comm.Recv(buf, source=peer)
            elif r == peer:
                comm.Recv(buf, source=0)
                comm.Send(buf, dest=0)
            if rep:
                times.append((time.perf_counter() - t0) / 2)
        out[n] = sorted(times)[len(times) // 2]
    return out


def _main() -> None:
    from mpi4py import MPI

    got = probe(MPI.COMM_WORLD)
    if got is not None:
        print(json.dumps(got))


def measure(hostfile: Optional[str] = None, cache: Optional[str] = None, timeout: float = 120.0,
            np_: int = 2) -> dict[str, Any]:
    """:func:`probe`'s figures for ``np_`` ranks placed as a run places them (``hostfile`` None: on this
    host): the point-to-point link inside a host and (with a hostfile of several hosts) between two,
    the all-reduce of all of them as a ring's per-step link (:func:`links`, :func:`remote_link`).

    Raises:
        LinkError: mpirun failed or printed no answer (one line, with its last words).
    """
    cache = cache or os.path.join(os.path.expanduser("~"), ".cache", "hvdhybrid", "links")
    key = "local" if hostfile is None else hashlib.sha1(open(hostfile, "rb").read()).hexdigest()[:12]
    np_ = max(2, np_)
    path = os.path.join(cache, f"{os.uname().nodename}-{key}-np{np_}.json")
    if os.path.exists(path):
        return dict(json.load(open(path)))
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe"]
    if hostfile is not None:
        cmd += ["--hostfile", hostfile]
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
    return dict(got)


@dataclass(frozen=True)
class Network:
    """The machines a plan is for: the link inside a host, the all-reduce's ring step, the link between
    hosts (None: one host), each host's cores and ranks, where the ranks go (``--map-by`` value -> the
    host of each rank; ``{"": [...]}``: as launched; None: one host), and what a crowded host costs
    beyond an even share of its cores."""

    link: Link
    allreduce: Link
    remote: Optional[Link] = None
    cores: int = 1
    ranks_per_host: int = 1
    hosts: Optional[dict[str, list[str]]] = None
    crowd: float = 1.0


def network(got: dict[str, Any], cores: int, ranks_per_host: int,
            hosts: Optional[dict[str, list[str]]] = None) -> Network:
    """The :class:`Network` of :func:`probe`'s figures, for hosts of ``cores`` cores and
    ``ranks_per_host`` ranks."""
    link, allreduce = links(got)
    return Network(link, allreduce, remote_link(got), cores, ranks_per_host, hosts, crowding(got))


def links(got: dict[str, Any]) -> tuple[Link, Link]:
    """The point-to-point link (inside a host) and the all-reduce's ring step, from :func:`probe`'s
    figures."""
    p2p = Link(got["latency"], got["bandwidth"], max(0.0, got.get("busy_latency", 0.0) - got["latency"]))
    return p2p, Link(got.get("ar_latency", p2p.latency), got.get("ar_bandwidth", p2p.bandwidth))


def remote_link(got: dict[str, Any]) -> Optional[Link]:
    """The point-to-point link between two hosts (None: the ranks measured were on one host)."""
    if "remote_latency" not in got:
        return None
    wake = max(0.0, got.get("remote_busy_latency", 0.0) - got["remote_latency"])
    return Link(got["remote_latency"], got["remote_bandwidth"], wake)


if __name__ == "__main__":
    _main()
