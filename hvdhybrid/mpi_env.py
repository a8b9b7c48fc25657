"""The Open MPI settings hvdhybrid gives itself, as environment defaults read at ``MPI_Init``.

Applied by ``import hvdhybrid`` (before mpi4py or Horovod start MPI); a value the user set,
in the environment or with ``mpirun --mca`` (which arrives as ``OMPI_MCA_*``), always wins.

- ``THP_MEM_ALLOC_ENABLE=1``: torch's large CPU allocations (activations travelling between
  stages) on transparent huge pages; Open MPI's single-copy transfers of them ran up to 1.5x
  faster here.
- ``OMPI_MCA_mpi_yield_when_idle=1``: a waiting rank yields its core instead of busy-polling;
  BERT fine-tuning on 2 ranks x 1 thread went from 1.45 to 1.05 s/step.
- When the job spans hosts, the all-reduce rules in ``openmpi-allreduce.rules`` (recursive
  doubling on 2-rank communicators; see that file and docs/performance.md). Not on one host:
  there, through shared memory, Open MPI's own choice was 1.47x faster at 64 MB. Left alone
  when the user set any ``coll_tuned`` parameter, so a forced algorithm is never overridden.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Optional

RULES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openmpi-allreduce.rules")
_TUNED = "OMPI_MCA_coll_tuned_"


def spans_hosts(environ: Mapping[str, str]) -> bool:
    """Whether this Open MPI job has ranks on more than one host (every rank sees the same answer)."""
    try:
        return int(environ["OMPI_COMM_WORLD_LOCAL_SIZE"]) < int(environ["OMPI_COMM_WORLD_SIZE"])
    except (KeyError, ValueError):
        return False


def defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings hvdhybrid would add to ``environ`` (those it already has are left out)."""
    want = {"THP_MEM_ALLOC_ENABLE": "1", "OMPI_MCA_mpi_yield_when_idle": "1"}
    if spans_hosts(environ) and not any(k.startswith(_TUNED) for k in environ):
        want[_TUNED + "use_dynamic_rules"] = "1"
        want[_TUNED + "dynamic_rules_filename"] = RULES_FILE
    return {k: v for k, v in want.items() if k not in environ}


def apply(environ: Optional[MutableMapping[str, str]] = None) -> dict[str, str]:
    """Add :func:`defaults` to ``environ`` (``os.environ`` by default); returns what was added."""
    env = os.environ if environ is None else environ
    added = defaults(env)
    env.update(added)
    return added


def read_rules(path: str = RULES_FILE) -> list[int]:
    """The numbers of an Open MPI rules file, comments dropped (what Open MPI's reader sees)."""
    with open(path) as f:
        return [int(word) for line in f for word in line.split("#", 1)[0].split()]
