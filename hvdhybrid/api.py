"""The public Python API: join the current launch, describe a model, train it (or step it yourself).

    groups = hvdhybrid.init(widths=(1, 1))       # under mpirun/horovodrun: layout and groups
    model = hvdhybrid.sequential_model(layer_fns, [2, 2], loss_fn, seed=0)
    trainer = hvdhybrid.Trainer(groups, model, make_optimizer, hvdhybrid.TrainConfig(...))
    trainer.fit(dataset)                         # or trainer.train_step(dataset, indices) in a loop
    hvdhybrid.finish(groups)

Everything here is re-exported by ``hvdhybrid`` itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from .comm.groups import ProcessGroups, check_launch, mpi_world

__all__ = ["init", "finish", "world_size", "parallelize_gpt2", "merge_gpt2"]


def world_size() -> int:
    """Ranks in this launch (1 when started without mpirun)."""
    w = mpi_world()
    check_launch(w)
    return int(w.Get_size())


def init(widths: Optional[Sequence[int]] = None, stages: Optional[int] = None, tensor: int = 1,
         world: Any = None, layout: str = "manual", command: Optional[Sequence[str]] = None,
         max_memory: Optional[str] = None) -> ProcessGroups:
    """Collective: the layout and process groups of the current launch.

    Args:
        widths: ranks per stage group of a bundle (``--bundle-shape``), or
        stages: that many stage groups of one rank (``--stages``); neither: one.
        tensor: ranks that split each replica's tensors.
        world: the communicator to split (default ``MPI.COMM_WORLD``).
        layout: ``"manual"`` (the sizes above) or ``"auto"``: the planner weighs every layout of the
            world for model command ``command`` (as after ``hvdtrain``, e.g. ``["gpt2", "--size",
            "mini"]``) on costs measured between this launch's ranks, rank 0 prints its choice, and
            every rank gets its groups; ``groups.plan`` keeps the plan (what ``plan.json`` keeps) and
            ``groups.plan["knobs"]`` the Trainer's knobs it chose (``TrainConfig(**knobs, ...)``).
        max_memory: with ``layout="auto"``, bytes per rank the layout must fit (``"2GB"``).

    Returns:
        This rank's :class:`ProcessGroups` (``.layout``, ``.coord``, the communicators).

    Raises:
        LayoutError: the launch's world size does not fit (the message names sizes that do).
        ConfigError: ``layout`` is neither, ``"auto"`` without a command, or (PlanError) nothing fits.
    """
    from .config import ConfigError, ParallelConfig

    w = world if world is not None else mpi_world()
    check_launch(w)
    if layout not in ("manual", "auto"):
        raise ConfigError(f"init(layout={layout!r}): give 'manual' (the sizes you pass) or 'auto' (the "
                          "planner chooses them for a model command)")
    if layout == "auto":
        if command is None or widths is not None or stages is not None or tensor != 1:
            raise ConfigError("init(layout='auto') takes the model command the planner weighs layouts for "
                              "(command=['mlp', ...]), and no widths, stages or tensor: it chooses those")
        return _init_auto(w, list(command), max_memory)
    if max_memory is not None:
        raise ConfigError("init(max_memory=...) is the planner's limit: pass it with layout='auto'")
    if widths is not None and stages is not None:
        from .layout.topology import LayoutError

        raise LayoutError("give either widths or stages, not both")
    given = tuple(widths) if widths is not None else None
    chosen = ParallelConfig(stages=stages, tensor=tensor).layout(w.Get_size(), widths=given)
    return ProcessGroups.create(chosen, w)


def _init_auto(w: Any, command: list[str], max_memory: Optional[str]) -> ProcessGroups:
    """``init(layout="auto")``: every rank reads the command as ``hvdtrain`` would, up to the point
    where it would train; there the planner chooses (:func:`~hvdhybrid.planner.auto.choose_layout`)."""
    from .cli.main import cli
    from .cli.plan_memory import run_as_planner
    from .planner.auto import choose_layout
    from .planner.space import Choice

    got: dict[str, Any] = {}

    def planner(name: str, cfg: Any, default_widths: tuple[int, ...], widths: Any, build: Any,
                tensor_parallel: bool) -> None:
        if max_memory is not None:
            cfg = cfg.resolved(max_memory=max_memory)
        chosen, plan = choose_layout(name, cfg, w, default_widths, widths, build, tensor_parallel)
        got.update(layout=chosen.parallel.layout(w.Get_size(), default_widths, widths), plan=plan)

    run_as_planner(command, cli, planner)
    chosen = Choice(**got["plan"]["chosen"]["settings"]).knobs()
    knobs = {k: chosen[k] for k in ("schedule", "microbatches", "zero", "recompute", "stages_per_rank",
                                    "placement")}  # the Trainer's; the layout is the groups'
    groups = ProcessGroups.create(got["layout"], w)
    return dataclasses.replace(groups, plan={**got["plan"], "knobs": knobs})


def finish(groups: ProcessGroups) -> None:
    """Collective: free the groups and shut Horovod down (after a barrier)."""
    from .comm import horovod_ops

    groups.close()
    horovod_ops.shutdown(groups.world)


def parallelize_gpt2(model: Any, groups: ProcessGroups, stages_per_rank: int = 1) -> Any:
    """A stock Hugging Face ``GPT2LMHeadModel``, converted in place to the launch's layout:
    its blocks cut into ``groups.pipeline_size`` x ``stages_per_rank`` stages, each split over
    ``groups.tensor_size`` ranks (heads, MLP, vocabulary). Returns the
    :class:`~hvdhybrid.parallel.staged.StagedModel` to train (with ``TrainConfig(stages_per_rank=...)``).

    Raises:
        ConfigError: the tensor size does not divide the heads, hidden size or vocabulary.
    """
    from .models.gpt2.model import parallelize

    return parallelize(model, groups, stages_per_rank)


def merge_gpt2(checkpoints: str, out: str) -> Any:
    """Merge the newest complete checkpoint under ``checkpoints`` (a run directory, its
    ``checkpoints/`` or one step) into ``out``, which ``GPT2LMHeadModel.from_pretrained`` loads.

    Returns:
        The merged ``GPT2LMHeadModel``.
    """
    from .models.gpt2.merge import merge_checkpoint

    return merge_checkpoint(checkpoints, out)[1]
