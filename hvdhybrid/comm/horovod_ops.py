"""The thin wrapper around Horovod: init with dynamic process sets, reduce, broadcast, shutdown."""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch

__all__ = ["ensure_init", "add_process_set", "remove_process_set", "allreduce_average",
           "grouped_average_async_", "average_async_", "synchronize", "broadcast_", "shutdown"]

_state = {"init": False}


def ensure_init(world: Any) -> None:
    """``hvd.init`` once per process, on ``world``, with dynamic process sets."""
    import horovod.torch as hvd

    if _state["init"]:
        return
    # A collective that waits on a dead or stuck rank: warn after 30 s, give up after 120 s.
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", "30")
    os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "120")
    hvd.init(comm=world, process_sets="dynamic")
    if hvd.size() != world.Get_size():
        raise RuntimeError(f"Horovod sees {hvd.size()} ranks but MPI sees {world.Get_size()}")
    if not hvd.mpi_threads_supported():
        raise RuntimeError("Horovod's MPI lacks MPI_THREAD_MULTIPLE, which hvdhybrid's p2p needs")
    _state["init"] = True


def add_process_set(ranks: Sequence[int]) -> Any:
    """Register a process set (collective over the world); the whole world is the global set."""
    import horovod.torch as hvd

    if sorted(ranks) == list(range(hvd.size())):
        return hvd.global_process_set  # Horovod refuses a duplicate of the global set
    return hvd.add_process_set(list(ranks))


def remove_process_set(ps: Any) -> None:
    import horovod.torch as hvd

    if ps is not hvd.global_process_set:
        hvd.remove_process_set(ps)


def allreduce_average(tensors: list[torch.Tensor], process_set: Any, name: str) -> list[torch.Tensor]:
    """Average ``tensors`` over ``process_set`` in one grouped ring all-reduce, in their own dtype
    (the float16 path is :class:`hvdhybrid.comm.fp16_allreduce.Fp16Allreduce`).

    ``name`` must be the same every step (Horovod caches the negotiation by name;
    fresh names evict its cache).
    """
    import horovod.torch as hvd

    out: list[torch.Tensor] = hvd.grouped_allreduce(tensors, name=name, op=hvd.Average,
                                                    process_set=process_set)
    return out


def average_async_(tensor: torch.Tensor, process_set: Any, name: str) -> Any:
    """Start an in-place average of ``tensor`` over ``process_set``; :func:`synchronize` its handle."""
    import horovod.torch as hvd

    return hvd.allreduce_async_(tensor, name=name, op=hvd.Average, process_set=process_set)


def grouped_average_async_(tensors: list[torch.Tensor], process_set: Any, name: str) -> Any:
    """Start an in-place average of ``tensors`` over ``process_set`` as one grouped all-reduce, in their
    own dtype; :func:`synchronize` its handle."""
    import horovod.torch as hvd

    return hvd.grouped_allreduce_async_(tensors, name=name, op=hvd.Average, process_set=process_set)


def synchronize(handle: Any) -> None:
    """Wait for an operation started by :func:`average_async_`: spin briefly, then sleep between polls.

    ``hvd.synchronize`` alone spins (a ``yield`` per poll) for as long as the reduce takes, which
    on a core shared with another rank takes the core from that rank's compute; a reduce across
    hosts takes milliseconds, so a poll every 0.2 ms costs nothing measurable."""
    import horovod.torch as hvd

    spins = 0
    while not hvd.poll(handle):
        spins += 1
        if spins > 200:
            time.sleep(0.0002)
    hvd.synchronize(handle)


def broadcast_(tensors: list[torch.Tensor], root_rank: int, process_set: Any, name: str) -> None:
    """In-place broadcast from global rank ``root_rank`` within ``process_set``.

    Named ops: Horovod matches unnamed ones by a per-process counter, which
    drifts apart when ranks of different stages broadcast different numbers
    of tensors (seen as 'Mismatched BROADCAST tensor shapes').
    """
    import horovod.torch as hvd

    handles = [hvd.broadcast_async_(t, root_rank, name=f"{name}.{i}", process_set=process_set)
               for i, t in enumerate(tensors)]
    for h in handles:
        hvd.synchronize(h)


def shutdown(world: Any) -> None:
    """Barrier first: shutting down while another set still reduces fails spuriously."""
    import horovod.torch as hvd

    if _state["init"]:
        world.Barrier()
        hvd.shutdown()
        _state["init"] = False
