"""CPU-staged point-to-point throughput: hvdhybrid's P2P against raw mpi4py ping-pong; mpirun -np 2."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from common import emit

from hvdhybrid.comm.groups import mpi_world
from hvdhybrid.comm.p2p import P2P, MsgKey

SIZES_MB = [1, 4, 16, 64]
ROUNDS = 10
REPEATS = 21


def main() -> None:
    world = mpi_world()
    rank = world.Get_rank()
    peer = 1 - rank
    p2p = P2P(world, 1, torch.device("cpu"))
    key = MsgKey(0, 0, 0, 0, 1)
    for mb in SIZES_MB:
        n = mb * 2**20 // 4
        buf = np.ones(n, dtype=np.float32)
        box = {"t": torch.ones(n)}

        def raw(buf: np.ndarray = buf) -> None:
            # raw mpi4py: a preallocated numpy buffer, blocking Send/Recv ping-pong
            if rank == 0:
                world.Send(buf, dest=peer, tag=1)
                world.Recv(buf, source=peer, tag=1)
            else:
                world.Recv(buf, source=peer, tag=1)
                world.Send(buf, dest=peer, tag=1)

        def ours(box: dict[str, torch.Tensor] = box) -> None:
            # hvdhybrid: a tensor message (header + payload), received into pooled buffers
            if rank == 0:
                p2p.send(peer, key, (box["t"],))
                p2p.wait_sends()
                (box["t"],) = p2p.recv(peer, key).wait()  # type: ignore[assignment]
            else:
                (box["t"],) = p2p.recv(peer, key).wait()  # type: ignore[assignment]
                p2p.send(peer, key, (box["t"],))
                p2p.wait_sends()

        times: dict[str, list[float]] = {"raw": [], "ours": []}
        pair = (("raw", raw), ("ours", ours))
        for rep in range(REPEATS + 1):  # interleaved, so drift hits both alike; rep 0 warms up
            for name, fn in pair if rep % 2 else pair[::-1]:  # each goes first in half the rounds
                world.Barrier()
                t0 = time.perf_counter()
                for _ in range(ROUNDS):
                    fn()
                if rep:
                    times[name].append(time.perf_counter() - t0)
        if rank == 0:
            raw_s, ours_s = statistics.median(times["raw"]), statistics.median(times["ours"])
            gbs = 2 * ROUNDS * mb / 1024
            emit({"name": "p2p", "mb": mb, "raw_GBps": gbs / raw_s, "hvdhybrid_GBps": gbs / ours_s,
                  "ratio": raw_s / ours_s})


if __name__ == "__main__":
    main()
