"""What one rank builds to train and run its share of a model: stages, schedules, sync, optimizer.

The :class:`Engine` holds no loop state (no step, no sampler): the loop is
:class:`~hvdhybrid.training.trainer.Trainer`, forward-only runs are
:mod:`evaluation`, checkpoints are :mod:`checkpointing`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from ..comm.groups import ProcessGroups
from ..comm.p2p import P2P
from ..config import Config, check_batch
from ..layout.placement import Placement, PlacementError
from ..layout.rows import replica_rows
from ..parallel.graph import StageGraph
from ..parallel.recompute import Recompute
from ..parallel.staged import StagedModel
from ..pipeline import schedules as sched
from ..pipeline.actions import Action
from ..pipeline.executor import Executor
from .data import Dataset
from .faults import injected_schedule
from .gradsync import GradSync
from .memory import return_freed_memory
from .precision import Precision
from .state import NamedState
from .zero import ZeroOptimizer

__all__ = ["Engine", "EngineParts", "OptimizerFn"]

OptimizerFn = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Engine:
    """This rank's stages of ``model``, placed, connected, scheduled and synchronised.

    Collective to build: every rank builds its engine at the same point.

    Args:
        groups: this rank's process groups (layout, coordinates, communicators).
        model: the staged model; this rank builds only the stages it runs.
        optimizer_fn: builds the optimizer from this rank's parameters.
        cfg: the run's knobs.
        device: where this rank computes.
        placement: which stage group runs each stage (default: stage ``s`` on
            stage group ``s``, which needs as many stage groups as stages).

    Raises:
        BatchError: the batch arithmetic of ``cfg`` does not fit the layout.
        PlacementError: the model's stages do not fit the layout's stage groups.
    """

    def __init__(self, groups: ProcessGroups, model: StagedModel, optimizer_fn: OptimizerFn,
                 cfg: Config, device: Optional[torch.device] = None,
                 placement: Optional[Placement] = None) -> None:
        layout, c = groups.layout, groups.coord
        self.groups, self.cfg, self.model = groups, cfg, model
        self.device = device if device is not None else torch.device("cpu")
        self.per_pass = check_batch(cfg, layout)
        self.graph: StageGraph = model.graph
        if placement is None:  # the config's --stages-per-rank and --placement, as a run takes them
            placement = cfg.parallel.placement_for(layout, cfg.pipeline.schedule)
            if placement is not None and len(placement.positions) != model.graph.num_stages:
                raise PlacementError(
                    f"the model has {model.graph.num_stages} stages but stages_per_rank "
                    f"{cfg.parallel.stages_per_rank} x {layout.num_stages} stage groups asks for "
                    f"{len(placement.positions)}; cut the model into that many stages")
        if placement is None:
            if model.graph.num_stages != layout.num_stages:
                raise PlacementError(
                    f"the model has {model.graph.num_stages} stages but the layout "
                    f"{layout.num_stages} stage groups; give a Placement (e.g. looped) or "
                    "as many stage groups as stages")
            placement = Placement.identity(model.graph.num_stages)
        self.placement = placement
        # -- build only this rank's stages (after the groups exist), then share local ties
        self.modules = {s: model.build(s).to(self.device) for s in placement.stages_on(c.stage)}
        model.share_local_ties(self.modules)
        groups.add_tied([ps for ps in (placement.groups_of(t.stages) for t in model.ties) if len(ps) > 1])

        from mpi4py import MPI

        hosts = groups.world.allgather(MPI.Get_processor_name())  # once: peers are named with their host

        def describe(local: int) -> str:
            peer = c.bundle * layout.bundle_size + local
            return f"{layout.coord(peer).tag()} on host {hosts[peer]}"

        self.p2p = P2P(groups.bundle, len(self.graph.edges), self.device, cfg.comm.timeout,
                       me=c.tag(), describe_peer=describe)
        n_slices = len(cfg.pipeline.slices) if cfg.pipeline.slices else 1
        self.p2p.check_tags(cfg.pipeline.microbatches, n_slices)
        self.precision = Precision(cfg.optim.precision)
        rc = Recompute.parse(cfg.pipeline.recompute)
        rc.check(self.graph.num_stages, model.attention, "this model", cfg.pipeline.slices is not None)
        self.executor = Executor(self.graph, layout, placement, c, self.modules, self.p2p,
                                 model.loss_fn, self.precision.autocast(self.device), rc)
        mbs = cfg.pipeline.microbatches
        schedule = injected_schedule(groups.world.Get_rank()) or cfg.pipeline.schedule
        self.plan: list[Action] = sched.build(schedule, self.graph, mbs, placement,
                                              n_slices, cfg.pipeline.weights_per_w())[c.stage]
        self.eval_plan: list[Action] = sched.build_forward_only(self.graph, mbs, placement)[c.stage]
        self.sync = GradSync(groups, placement, self.modules, cfg.comm.fp16_compression)
        self.sync.broadcast_parameters(self.modules)
        self.optimizer: Any
        if cfg.optim.zero and groups.data_set is not None:  # one bundle: nothing to shard
            return_freed_memory()  # the build's temporaries go before the flat buffer comes
            zero = ZeroOptimizer(self.sync.params, optimizer_fn, groups.data, cfg.optim.zero,
                                 fp16=self.sync.fp16_compression)
            zero.set_weights(self.sync.weight_of)
            if zero.level == 2 and self.sync.early_reduce:  # gradients go to their owners in the backward
                uses: dict[int, Sequence[nn.Parameter]] = {s: list(m.parameters())
                                                          for s, m in self.modules.items()}
                every = cfg.comm.reduce == "microbatch" and len(self.modules) == 1
                self.executor.grad_watch = zero.watch(uses, every=every)
            self.optimizer = self.sync.zero = zero
            self.executor.saved.exclude(self.sync.params)  # their storage is now the flat buffer
        else:  # a rank with nothing to train (a frozen stage) gets an optimizer with an empty group
            empty: Any = [{"params": []}]
            self.optimizer = optimizer_fn(self.sync.params if self.sync.params else empty)
        #: why --reduce overlap fell back to the reduce after the schedule (None: it did not)
        self.reduce_fallback = self.sync.overlap_blocker(cfg.optim.zero) if cfg.comm.reduce == "overlap" \
            else self.sync.microbatch_blocker(len(self.modules)) if cfg.comm.reduce == "microbatch" else None
        if cfg.comm.reduce == "overlap" and self.reduce_fallback is None:
            from .overlap import OverlapReduce

            self.sync.overlap = OverlapReduce(
                self.sync.params, {s: list(m.parameters()) for s, m in self.modules.items()},
                groups.data_set, f"grads.s{c.stage}.r{c.replica}.t{c.tensor}", self.sync.fp16_compression)
            self.executor.grad_watch = self.sync.overlap.watch
            self.plan = sched.with_reduce({c.stage: self.plan})[c.stage]
        for g in self.optimizer.param_groups:  # the base of the schedule; saved with the groups
            g.setdefault("initial_lr", g["lr"])
        self.state = NamedState({s: model.stage_parameters(s, m) for s, m in self.modules.items()},
                                {s: model.stage_buffers(s, m) for s, m in self.modules.items()},
                                self.optimizer)
        #: BatchNorm running means and variances: averaged over the copies of a stage after each step
        self.statistics = [b for m in self.modules.values() for mod in m.modules()
                           if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)
                           for b in (mod.running_mean, mod.running_var) if b is not None]
        # the sink's loss counts once per row replica: on tensor rank 0
        self.is_sink = self.graph.sink in self.modules and c.tensor == 0
        #: written into every checkpoint's common file (e.g. the model's Hugging Face config for merging)
        self.checkpoint_extra: dict[str, Any] = dict(model.checkpoint_extra or {})

    def train_mode(self, on: bool) -> None:
        """Put this rank's stages in training (dropout on) or evaluation mode."""
        for m in self.modules.values():
            m.train(on)

    # -- data ------------------------------------------------------------------
    def batch_fn(self, data: Dataset, indices: list[int], microbatches: int) -> Callable[[int], Any]:
        """``mb -> (inputs, targets)``: this replica's rows of microbatch ``mb`` of ``indices``."""
        rows = self.rows_fn(indices, microbatches)

        def fn(mb: int) -> tuple[Any, Any]:
            x, y = data.batch(rows(mb))
            return _to(x, self.device), _to(y, self.device)
        return fn

    def rows_fn(self, indices: list[int], microbatches: int) -> Callable[[int], list[int]]:
        """``mb -> data-set indices`` of this replica's rows of microbatch ``mb`` of ``indices``."""
        layout, c = self.groups.layout, self.groups.coord
        width = layout.widths[c.stage]

        def fn(mb: int) -> list[int]:
            lo, hi = replica_rows(len(indices), layout.num_bundles, c.bundle, microbatches,
                                  mb, width, c.replica)
            return indices[lo:hi]
        return fn

    # -- agreement ---------------------------------------------------------------
    def world_sum(self, values: list[float], what: str) -> list[float]:
        """Sum a few numbers over every rank (buffer call: it releases the GIL), with a deadline."""
        import numpy as np
        from mpi4py import MPI

        mine = np.array(values, dtype=np.float64)
        total = np.empty_like(mine)
        req = self.groups.world.Iallreduce(mine, total, op=MPI.SUM)
        self.p2p.wait_all([req], lambda: what)
        return [float(v) for v in total]


class EngineParts:
    """An engine's parts under their own names, for a class that holds one in ``self.engine``.

    Read-only: each reads the engine's attribute of the same name (the
    :class:`~hvdhybrid.training.trainer.Trainer` offers them as before the engine).
    """

    engine: Engine

    @property
    def cfg(self) -> Config:
        return self.engine.cfg

    @property
    def groups(self) -> ProcessGroups:
        return self.engine.groups

    @property
    def model(self) -> StagedModel:
        return self.engine.model

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def per_pass(self) -> int:
        return self.engine.per_pass

    @property
    def graph(self) -> StageGraph:
        return self.engine.graph

    @property
    def placement(self) -> Placement:
        return self.engine.placement

    @property
    def modules(self) -> dict[int, torch.nn.Module]:
        return self.engine.modules

    @property
    def p2p(self) -> P2P:
        return self.engine.p2p

    @property
    def precision(self) -> Precision:
        return self.engine.precision

    @property
    def executor(self) -> Executor:
        return self.engine.executor

    @property
    def plan(self) -> list[Action]:
        return self.engine.plan

    @property
    def eval_plan(self) -> list[Action]:
        return self.engine.eval_plan

    @property
    def sync(self) -> GradSync:
        return self.engine.sync

    @property
    def optimizer(self) -> Any:  # a torch optimizer, or a ZeroOptimizer (--zero)
        return self.engine.optimizer

    @property
    def state(self) -> NamedState:
        return self.engine.state

    @property
    def is_sink(self) -> bool:
        return self.engine.is_sink

    @property
    def checkpoint_extra(self) -> dict[str, Any]:
        """Written into every checkpoint's common file (e.g. the model's Hugging Face config)."""
        return self.engine.checkpoint_extra

    def train_mode(self, on: bool) -> None:
        self.engine.train_mode(on)

    def batch_fn(self, data: Dataset, indices: list[int], microbatches: int) -> Callable[[int], Any]:
        """``mb -> (inputs, targets)``: this replica's rows of microbatch ``mb`` of ``indices``."""
        return self.engine.batch_fn(data, indices, microbatches)

    def rows_fn(self, indices: list[int], microbatches: int) -> Callable[[int], list[int]]:
        """``mb -> data-set indices`` of this replica's rows of microbatch ``mb`` of ``indices``."""
        return self.engine.rows_fn(indices, microbatches)

    def world_sum(self, values: list[float], what: str) -> list[float]:
        """Sum a few numbers over every rank, with a deadline."""
        return self.engine.world_sum(values, what)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor) or hasattr(x, "to"):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(t, device) for t in x)
    return x
