"""Rank arithmetic, pure: no mpi4py, Horovod or click (tests/unit/test_layers.py checks it).

    topology    Layout(world_size, widths, tensor): every rank's (bundle, stage, replica, tensor)
                coordinates and the members of its groups
    placement   Placement: which stage group runs each model stage (identity, looped, contiguous)
    rows        the rows of (bundle, microbatch, replica) of a global batch; re-batching pieces
    hostfile    `host slots=N` hostfiles; ranks onto hosts as mpirun --map-by slot|node places them
    traffic     bytes per step on every link between hosts

    from hvdhybrid.layout import Layout
    Layout(8, (1, 1), tensor=2).describe()   # '8 ranks: 2 bundles x 2 stage groups x tensor 2 ...'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports

__all__ = ["BatchError", "HostfileError", "Layout", "LayoutError", "ModelSizes", "Placement",
           "PlacementError", "RankCoord", "check_batch", "link_bytes", "parse_bundle_shape",
           "place_ranks", "read_hostfile", "replica_rows"]

if TYPE_CHECKING:
    from .hostfile import HostfileError, place_ranks, read_hostfile
    from .placement import Placement, PlacementError
    from .rows import BatchError, check_batch, replica_rows
    from .topology import Layout, LayoutError, RankCoord, parse_bundle_shape
    from .traffic import ModelSizes, link_bytes

__getattr__ = exports(__name__, {
    "Layout": "topology", "LayoutError": "topology", "RankCoord": "topology", "parse_bundle_shape":
    "topology", "Placement": "placement", "PlacementError": "placement", "BatchError": "rows",
    "check_batch": "rows", "replica_rows": "rows", "HostfileError": "hostfile", "place_ranks":
    "hostfile", "read_hostfile": "hostfile", "ModelSizes": "traffic", "link_bytes": "traffic",
})
