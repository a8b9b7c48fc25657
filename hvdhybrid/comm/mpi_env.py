"""The Open MPI settings hvdhybrid gives itself, as environment defaults read at ``MPI_Init``.

Applied by ``import hvdhybrid`` (before mpi4py or Horovod start MPI); a value the user set,
in the environment or with ``mpirun --mca`` (which arrives as ``OMPI_MCA_*``), always wins.

- ``THP_MEM_ALLOC_ENABLE=1``: torch's large CPU allocations (activations travelling between
  stages) on transparent huge pages; Open MPI's single-copy transfers of them ran up to 1.5x
  faster here.
- ``OMPI_MCA_mpi_yield_when_idle=1``: a waiting rank yields its core instead of busy-polling;
  BERT fine-tuning on 2 ranks x 1 thread went from 1.45 to 1.05 s/step.
- When every rank has a host of its own, the all-reduce rules in ``openmpi-allreduce.rules``
  (recursive doubling between 2 ranks, ring among more; see that file and docs/performance.md):
  then every communicator crosses the network, where these were 1.2-1.8x faster than Open
  MPI's own choice. Not when ranks share a host: through shared memory recursive doubling was
  1.5-4x slower at 16-64 MB, and a host's ranks form communicators of their own (tensor groups,
  stage groups, data groups with ``--map-by node``). Left alone when the user set any
  ``coll_tuned`` parameter, so a forced algorithm is never overridden.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Optional

RULES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openmpi-allreduce.rules")
_TUNED = "OMPI_MCA_coll_tuned_"


def host_per_rank(environ: Mapping[str, str]) -> bool:
    """Whether every rank of this Open MPI job (2 or more) has a host of its own.

    From the nodes the job uses and the world size, which every rank sees alike: all ranks
    then give MPI the same rules (ranks that chose different algorithms would not meet).
    """
    try:
        size = int(environ["OMPI_COMM_WORLD_SIZE"])
        return size > 1 and int(environ["OMPI_MCA_orte_num_nodes"]) == size
    except (KeyError, ValueError):
        return False


def defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings hvdhybrid would add to ``environ`` (those it already has are left out)."""
    want = {"THP_MEM_ALLOC_ENABLE": "1", "OMPI_MCA_mpi_yield_when_idle": "1"}
    if host_per_rank(environ) and not any(k.startswith(_TUNED) for k in environ):
        want[_TUNED + "use_dynamic_rules"] = "1"
        want[_TUNED + "dynamic_rules_filename"] = RULES_FILE
    return {k: v for k, v in want.items() if k not in environ}


def rules_given(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` gives Open MPI hvdhybrid's all-reduce rules (set by :func:`apply` or by hand)."""
    return environ.get(_TUNED + "dynamic_rules_filename") == RULES_FILE


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
