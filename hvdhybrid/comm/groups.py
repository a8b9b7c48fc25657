"""ProcessGroups: bundle, stage, row, tensor, data and tied communicators plus Horovod sets, as one object."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..errors import InputError
from ..layout.topology import Layout, RankCoord

__all__ = ["LaunchError", "ProcessGroups", "mpi_world", "check_launch", "warm_pickle_collectives"]


class LaunchError(InputError):
    """The job was launched in a way hvdhybrid cannot run under (e.g. horovodrun --gloo)."""


def mpi_world() -> Any:
    """``MPI.COMM_WORLD``, with MPI initialised for the threads Horovod needs."""
    import mpi4py

    mpi4py.rc.thread_level = "multiple"  # Horovod's background thread + our p2p calls
    from mpi4py import MPI

    return MPI.COMM_WORLD


def check_launch(world: Any) -> None:
    """Stop early when the launcher gave MPI a smaller world than the job has.

    ``horovodrun --gloo`` starts every process with ``HOROVOD_SIZE=N`` but
    without MPI, so each process sees an MPI world of 1.
    """
    hsize = int(os.environ.get("HOROVOD_SIZE", "0") or 0)
    if hsize > world.Get_size():
        raise LaunchError(
            f"the launcher started {hsize} processes but MPI sees a world of {world.Get_size()}: "
            "hvdhybrid needs MPI point-to-point between stages; launch with "
            "`horovodrun --mpi -np N ...` or `mpirun -np N ...`, not `horovodrun --gloo`")


def warm_pickle_collectives(comm: Any) -> None:
    """Run each lowercase (pickle) collective once, before Horovod's thread starts.

    The first such call on a communicator makes mpi4py duplicate it — a
    collective ``MPI_Comm_dup`` done while holding the GIL. Once Horovod's
    background thread runs, that thread needs the GIL to finish an allreduce,
    so a rank blocked in that dup while its peers wait in Horovod deadlocks
    the job (seen here about once in 15 runs). Warmed up, later calls only
    reuse the duplicate. Idempotent and collective over ``comm``.
    """
    comm.allreduce(0)
    comm.allgather(0)
    comm.gather(0, root=0)
    comm.bcast(0, root=0)
    comm.barrier()


@dataclass(frozen=True)
class ProcessGroups:
    """Communicators of one rank, made by ``COMM_WORLD.Split``, plus its Horovod process set.

    Attributes:
        layout: the layout the groups were made for.
        coord: this rank's coordinates.
        world: ``COMM_WORLD``.
        bundle: ranks of this rank's bundle (p2p between stages runs here).
        stage: every rank of this rank's stage group in its bundle.
        rows: the replicas of the stage group with this rank's tensor rank: they
            split rows, and average their gradients.
        tensor: the tensor ranks of this rank's replica: they split tensors
            (the collectives of tensor-parallel layers run here).
        data: the same (stage, replica, tensor rank) across bundles (Horovod allreduce).
        data_set: the Horovod process set of ``data``, or ``None`` with one bundle.
        tied: per set of stage groups that share a tied parameter, the
            communicator of this rank's counterparts in them (same bundle,
            replica and tensor rank), ordered by stage group; made by :meth:`add_tied`.
    """

    layout: Layout
    coord: RankCoord
    world: Any
    bundle: Any
    stage: Any
    rows: Any
    tensor: Any
    data: Any
    data_set: Optional[Any]
    all_sets: tuple[Any, ...] = ()
    tied: dict[tuple[int, ...], Any] = field(default_factory=dict)
    plan: Optional[dict[str, Any]] = None

    @classmethod
    def create(cls, layout: Layout, world: Any, use_horovod: bool = True) -> ProcessGroups:
        """Split ``world`` by ``layout`` (collective over ``world``)."""
        if world.Get_size() != layout.world_size:
            raise LaunchError(f"layout is for {layout.world_size} ranks, world has {world.Get_size()}")
        r = world.Get_rank()
        c = layout.coord(r)
        bundle = world.Split(c.bundle, r)
        stage = world.Split(c.bundle * layout.num_stages + c.stage, r)
        rows = world.Split((c.bundle * layout.num_stages + c.stage) * layout.tensor + c.tensor, r)
        tensor = world.Split(c.bundle * layout.bundle_size
                             + layout.bundle_local_rank(c.stage, c.replica, 0), r)
        data = world.Split(layout.bundle_local_rank(c.stage, c.replica, c.tensor), r)
        for comm in (world, bundle, stage, rows, tensor, data):
            warm_pickle_collectives(comm)
        data_set, sets = None, []
        if use_horovod and layout.num_bundles > 1:
            from . import horovod_ops

            horovod_ops.ensure_init(world)
            # add_process_set is collective over the world: every rank registers every set
            sets = [horovod_ops.add_process_set(m) for m in layout.all_data_groups()]
            data_set = sets[layout.bundle_local_rank(c.stage, c.replica, c.tensor)]
        return cls(layout, c, world, bundle, stage, rows, tensor, data, data_set, tuple(sets))

    def add_tied(self, position_sets: Sequence[tuple[int, ...]]) -> None:
        """Collective over the world: a communicator for every set of stage groups sharing a tie.

        Every rank passes the same sets (they come from the model). Within a
        set, rank ``i`` of the new communicator is the counterpart in the
        ``i``-th stage group of the (sorted) set.
        """
        from mpi4py import MPI

        c, lay = self.coord, self.layout
        for ps in sorted(set(tuple(sorted(p)) for p in position_sets)):
            if ps in self.tied:
                continue
            widths = {lay.widths[p] for p in ps}
            if len(widths) > 1:
                raise LaunchError(f"stage groups {list(ps)} share a tied parameter but have "
                                  f"widths {[lay.widths[p] for p in ps]}; give them equal widths")
            if c.stage in ps:
                color = (c.bundle * lay.bundle_size + c.replica * lay.tensor + c.tensor)
                comm = self.world.Split(color, ps.index(c.stage))
                warm_pickle_collectives(comm)
            else:
                comm = self.world.Split(MPI.UNDEFINED, 0)
            self.tied[ps] = comm

    # -- the Megatron/OSLO-style accessors: rank and size in each dimension ---------------------
    @property
    def data_rank(self) -> int:
        """This rank's bundle: its data-parallel rank."""
        return int(self.coord.bundle)

    @property
    def data_size(self) -> int:
        return int(self.layout.num_bundles)

    @property
    def tensor_rank(self) -> int:
        return int(self.coord.tensor)

    @property
    def tensor_size(self) -> int:
        return int(self.layout.tensor)

    @property
    def pipeline_rank(self) -> int:
        """This rank's stage group (its pipeline stage, with one model stage per group)."""
        return int(self.coord.stage)

    @property
    def pipeline_size(self) -> int:
        return int(self.layout.num_stages)

    def close(self) -> None:
        """Free the communicators and process sets (collective over the world)."""
        self.world.Barrier()  # nobody removes a set while a peer still reduces on it
        if self.all_sets:
            from . import horovod_ops

            for ps in self.all_sets:
                horovod_ops.remove_process_set(ps)
        from mpi4py import MPI

        for comm in (self.bundle, self.stage, self.rows, self.tensor, self.data, *self.tied.values()):
            if comm != MPI.COMM_NULL:
                comm.Free()
