"""Communication: the communicators of a rank, point-to-point, and the one door to Horovod.

    groups          ProcessGroups: bundle / stage / rows / tensor / data / tied communicators, made once
                    and handed to whatever needs them
    p2p             tensor messages between stages through CPU buffers (uppercase mpi4py calls)
    horovod_ops     every use of Horovod: init with process sets, all-reduce, broadcast, shutdown
    fp16_allreduce  gradient all-reduce with float16 on the wire (--fp16-compression)
    mpi_env         the Open MPI settings hvdhybrid gives itself before MPI starts
    agreement       user-input checks that all ranks agree on: one line, exit code 2 everywhere
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports

__all__ = ["Fp16Allreduce", "LaunchError", "P2P", "P2PTimeout", "ProcessGroups", "agreed",
           "check_launch", "mpi_world", "world"]

if TYPE_CHECKING:
    from .agreement import agreed, world
    from .fp16_allreduce import Fp16Allreduce
    from .groups import LaunchError, ProcessGroups, check_launch, mpi_world
    from .p2p import P2P, P2PTimeout

__getattr__ = exports(__name__, {
    "ProcessGroups": "groups", "LaunchError": "groups", "mpi_world": "groups", "check_launch": "groups",
    "P2P": "p2p", "P2PTimeout": "p2p", "Fp16Allreduce": "fp16_allreduce", "agreed": "agreement", "world":
    "agreement",
})
