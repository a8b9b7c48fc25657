"""hvdhybrid: hybrid-parallel (pipeline x tensor x data) training on MPI and Horovod.

The public API (imported on first use, so ``import hvdhybrid`` stays light)::

    init, finish, world_size        join the launch: layout and process groups (api.py), with
                                    data/tensor/pipeline rank and size accessors; init(layout="auto",
                                    command=[...]) lets the planner choose the layout
    parallelize_gpt2, merge_gpt2    a stock HF GPT-2 in tensor x pipeline x data; merged checkpoints
    Layout, Placement, StageGraph   rank arithmetic, stage placement, the stage graph
    StagedModel, sequential_model, split_sequential, Tie
                                    a model cut into stages (keyed per-stage builds, ties)
    Trainer                         the training loop (fit, or train_step from your own loop)
    Config, TrainConfig             the config tree (sections parallel, pipeline, optim, comm, run);
                                    TrainConfig(steps=..., ...) builds one from field names
    KeyedDropout, keyed_dropouts    dropout that does not depend on the layout
    TensorDataset, Sampler          data as index -> rows, the global-batch sampler
    Job                             what a build function returns to `hvdtrain run MODULE:FN`
    Precision                       fp32 / bf16 / fp16 (with dynamic loss scaling), TrainConfig.precision
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvdhybrid._lazy import exports
from hvdhybrid.comm import mpi_env as _mpi_env

# Open MPI and torch settings read at MPI_Init / first allocation (huge pages, yielding
# while waiting, all-reduce rules across hosts); a user's value wins. See mpi_env.py.
_mpi_env.apply()

__version__ = "0.1.0"

_EXPORTS = {
    "init": "api", "finish": "api", "world_size": "api", "parallelize_gpt2": "api", "merge_gpt2": "api",
    "Layout": "layout.topology", "Placement": "layout.placement", "StageGraph": "parallel.graph",
    "StagedModel": "parallel.staged", "sequential_model": "parallel.staged",
    "split_sequential": "parallel.staged", "Tie": "parallel.ownership",
    "Trainer": "training.trainer", "TrainConfig": "config", "Config": "config",
    "KeyedDropout": "parallel.dropout", "keyed_dropouts": "parallel.dropout",
    "TensorDataset": "training.data", "Sampler": "training.data", "Job": "training.job",
    "Precision": "training.precision",
}

__all__ = ["Config", "Job", "KeyedDropout", "Layout", "Placement", "Precision", "Sampler", "StageGraph",
           "StagedModel",
           "TensorDataset", "Tie", "TrainConfig", "Trainer", "__version__", "finish", "init",
           "keyed_dropouts", "merge_gpt2", "parallelize_gpt2", "sequential_model", "split_sequential",
           "world_size"]

if TYPE_CHECKING:
    from .api import finish, init, merge_gpt2, parallelize_gpt2, world_size
    from .config import Config, TrainConfig
    from .layout.placement import Placement
    from .layout.topology import Layout
    from .parallel.dropout import KeyedDropout, keyed_dropouts
    from .parallel.graph import StageGraph
    from .parallel.ownership import Tie
    from .parallel.staged import StagedModel, sequential_model, split_sequential
    from .training.data import Sampler, TensorDataset
    from .training.job import Job
    from .training.precision import Precision
    from .training.trainer import Trainer


__getattr__ = exports(__name__, _EXPORTS)
