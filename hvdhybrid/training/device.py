"""Pick this rank's device: its local GPU where there is one, else the CPU."""

from __future__ import annotations

import os

import torch

from ..errors import InputError

__all__ = ["DeviceError", "local_rank", "local_size", "pick_device", "rank_threads", "usable_cores"]


class DeviceError(InputError):
    """A device that was asked for and is not there."""


def local_rank() -> int:
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "HOROVOD_LOCAL_RANK",
                "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def local_size() -> int:
    for var in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "HOROVOD_LOCAL_SIZE"):
        if os.environ.get(var, "").isdigit():
            return max(1, int(os.environ[var]))
    return 1


def rank_threads(helpers: int = 0) -> int:
    """Torch threads for this rank: the host's cores over its ranks (less a core per helper process of
    each), never more than the cores this process may run on. mpirun binds each rank to one core at
    np <= 2: two threads on that core spun against each other at every OpenMP barrier, and one rank's
    steps took 1.8x as long as with one thread (0.139 against 0.078 s on the bench MLP)."""
    n = local_size()
    return max(1, min(usable_cores(), ((os.cpu_count() or 1) - n * helpers) // n))


def usable_cores() -> int:
    """The cores this process may run on (its affinity: one, where mpirun bound the rank to a core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pick_device(choice: str) -> torch.device:
    """``auto``: ``cuda:<local rank mod GPUs>`` if CUDA is usable, else ``cpu``.

    Raises:
        DeviceError: for ``cuda`` on a machine without a usable GPU, or an unknown name.
    """
    if choice == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if choice == "auto":
        return torch.device(f"cuda:{local_rank() % torch.cuda.device_count()}") if has_cuda \
            else torch.device("cpu")
    if choice == "cuda":
        if not has_cuda:
            raise DeviceError("--device cuda was asked for but no CUDA GPU is usable here; "
                              "use --device auto or --device cpu")
        return torch.device(f"cuda:{local_rank() % torch.cuda.device_count()}")
    raise DeviceError(f"unknown device {choice!r}; use auto, cpu or cuda")
