"""The public Python API: join the current launch, describe a model, train it (or step it yourself).

    groups = hvdhybrid.init(widths=(1, 1))       # under mpirun/horovodrun: layout and groups
    model = hvdhybrid.sequential_model(layer_fns, [2, 2], loss_fn, seed=0)
    trainer = hvdhybrid.Trainer(groups, model, make_optimizer, hvdhybrid.TrainConfig(...))
    trainer.fit(dataset)                         # or trainer.train_step(dataset, indices) in a loop
    hvdhybrid.finish(groups)

Everything here is re-exported by ``hvdhybrid`` itself.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .comm.groups import ProcessGroups, check_launch, mpi_world

__all__ = ["init", "finish", "world_size", "parallelize_gpt2", "merge_gpt2"]


def world_size() -> int:
    """Ranks in this launch (1 when started without mpirun)."""
    w = mpi_world()
    check_launch(w)
    return int(w.Get_size())


def init(widths: Optional[Sequence[int]] = None, stages: Optional[int] = None, tensor: int = 1,
         world: Any = None) -> ProcessGroups:
    """Collective: the layout and process groups of the current launch.

    Args:
        widths: ranks per stage group of a bundle (``--bundle-shape``), or
        stages: that many stage groups of one rank (``--stages``); neither: one.
        tensor: ranks that split each replica's tensors.
        world: the communicator to split (default ``MPI.COMM_WORLD``).

    Returns:
        This rank's :class:`ProcessGroups` (``.layout``, ``.coord``, the communicators).

    Raises:
        LayoutError: the launch's world size does not fit (the message names sizes that do).
    """
    from .config import ParallelConfig

    w = world if world is not None else mpi_world()
    check_launch(w)
    if widths is not None and stages is not None:
        from .layout.topology import LayoutError

        raise LayoutError("give either widths or stages, not both")
    given = tuple(widths) if widths is not None else None
    layout = ParallelConfig(stages=stages, tensor=tensor).layout(w.Get_size(), widths=given)
    return ProcessGroups.create(layout, w)


def finish(groups: ProcessGroups) -> None:
    """Collective: free the groups and shut Horovod down (after a barrier)."""
    from .comm import horovod_ops

    groups.close()
    horovod_ops.shutdown(groups.world)


def parallelize_gpt2(model: Any, groups: ProcessGroups) -> Any:
    """A stock Hugging Face ``GPT2LMHeadModel``, converted in place to the launch's layout:
    its blocks cut into ``groups.pipeline_size`` stages, each split over ``groups.tensor_size``
    ranks (heads, MLP, vocabulary). Returns the :class:`~hvdhybrid.parallel.staged.StagedModel` to train.

    Raises:
        ConfigError: the tensor size does not divide the heads, hidden size or vocabulary.
    """
    from .models.gpt2.model import parallelize

    return parallelize(model, groups)


def merge_gpt2(checkpoints: str, out: str) -> Any:
    """Merge the newest complete checkpoint under ``checkpoints`` (a run directory, its
    ``checkpoints/`` or one step) into ``out``, which ``GPT2LMHeadModel.from_pretrained`` loads.

    Returns:
        The merged ``GPT2LMHeadModel``.
    """
    from .models.gpt2.merge import merge_checkpoint

    return merge_checkpoint(checkpoints, out)[1]
