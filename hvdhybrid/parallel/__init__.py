"""The parallel model: a model cut into stages, and the pieces that keep it layout-independent.

    graph            StageGraph: which stage feeds which (chains, fork and join)
    staged           StagedModel: how each stage is built, full-model names, ties; keyed builds
    partition        cut layers into stages: uniform, by parameters, by measured time
    ownership        the Replicated / Sharded / Tied tags every reduction reads
    tensor_parallel  Megatron's layers over a tensor communicator that the caller hands in
    dropout          KeyedDropout: masks keyed by (seed, step, layer, data row)
    randomness       draws keyed by (seed, step, what), never by rank or microbatch
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports

__all__ = ["GraphError", "KeyedDropout", "PartitionError", "Replicated", "Sharded", "StageGraph",
           "StagedModel", "Tie", "Tied", "keyed_dropouts", "keyed_layers", "partition_sizes",
           "sequential_model", "split_sequential"]

if TYPE_CHECKING:
    from .dropout import KeyedDropout, keyed_dropouts
    from .graph import GraphError, StageGraph
    from .ownership import Replicated, Sharded, Tie, Tied
    from .partition import PartitionError
    from .staged import StagedModel, keyed_layers, partition_sizes, sequential_model, split_sequential

__getattr__ = exports(__name__, {
    "StageGraph": "graph", "GraphError": "graph", "StagedModel": "staged", "sequential_model": "staged",
    "split_sequential": "staged", "keyed_layers": "staged", "partition_sizes": "staged",
    "PartitionError": "partition", "Tie": "ownership", "Replicated": "ownership", "Sharded": "ownership",
    "Tied": "ownership", "KeyedDropout": "dropout", "keyed_dropouts": "dropout",
})
