"""The training loop every model uses: build this rank's stages, schedule, sync, step, report.

Evaluation and prediction live in :mod:`evaluation`, the gradient guard next
to the averaging in :mod:`gradsync`, checkpoint contents in :mod:`state`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..comm.groups import ProcessGroups
from ..comm.p2p import P2P
from ..layout.placement import Placement, PlacementError
from ..layout.rows import BatchError, check_batch, replica_rows
from ..log import get_logger
from ..parallel import randomness
from ..parallel.ownership import Sharded, join, owner_of, shard_of
from ..parallel.staged import StagedModel
from ..pipeline import schedules as sched
from ..pipeline import trace
from ..pipeline.executor import Executor
from . import lr_schedule, precision
from .data import Dataset, Sampler
from .faults import inject_failure
from .gradsync import GradSync
from .state import COMMON, NamedState, check_model, rng_state, set_rng_state
from .stopping import Stopped, StopSignals

__all__ = ["TrainConfig", "Trainer", "MetricFn", "Diverged"]


class Diverged(RuntimeError):
    """The agreed loss is not finite: training cannot continue from here."""

# (sink output, targets) -> (sum of the metric over rows, number of rows)
MetricFn = Callable[[Any, Any], tuple[float, int]]
OptimizerFn = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class TrainConfig:
    """Knobs of one run. ``batch_size`` is the global batch of one optimizer step."""

    steps: int = 10
    batch_size: int = 64
    microbatches: int = 1
    accumulate: int = 1
    schedule: str = "1f1b"
    fp16: bool = True
    seed: int = 0
    log_every: int = 1
    progress: bool = True
    out: Optional[str] = None
    model_name: str = "model"
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end (needs out)
    keep: int = 3  # complete checkpoints kept
    timeout: float = 300.0  # seconds a point-to-point wait may take before it is an error
    clip_grad: float = 0.0  # clip the whole model's gradient to this global L2 norm (0: off)
    warmup: int = 0  # steps of linear learning-rate warmup
    lr_schedule: str = "constant"  # after warmup: constant, linear or cosine decay to 0 at `steps`
    precision: str = "fp32"  # fp32, bf16 (autocast) or fp16 (autocast, dynamic loss scaling)
    slices: Optional[tuple[int, ...]] = None  # token slices of every sequence (TeraPipe); None: whole

    def validate(self, num_bundles: int, widths: tuple[int, ...]) -> int:
        """Check the batch arithmetic; return rows per pass (batch_size / accumulate).

        Raises:
            BatchError: naming the sizes and a batch size that works.
        """
        if self.steps < 0:
            raise BatchError(f"--steps must be >= 0, got {self.steps}")
        if self.checkpoint_every < 0 or self.keep < 1:
            raise BatchError(f"--checkpoint-every must be >= 0 and --keep >= 1, got "
                             f"{self.checkpoint_every} and {self.keep}")
        if not self.clip_grad >= 0:
            raise BatchError(f"--clip-grad must be >= 0 (0: off), got {self.clip_grad}")
        lr_schedule.check(self.lr_schedule, self.warmup, self.steps)
        precision.check(self.precision)
        if self.accumulate < 1:
            raise BatchError(f"--accumulate must be >= 1, got {self.accumulate}")
        if self.batch_size % self.accumulate:
            raise BatchError(f"--batch-size {self.batch_size} is not divisible by --accumulate "
                             f"{self.accumulate}")
        per_pass = self.batch_size // self.accumulate
        try:
            check_batch(per_pass, num_bundles, self.microbatches, widths)
        except BatchError as e:
            if self.accumulate == 1:
                raise
            raise BatchError(f"{e} (per accumulation pass; --batch-size is "
                             f"{self.accumulate} passes)") from None
        return per_pass


class Trainer:
    """Runs one rank's share of training.

    Args:
        groups: this rank's process groups (layout, coordinates, communicators).
        model: the staged model; this rank builds only the stages it runs.
        optimizer_fn: builds the optimizer from this rank's parameters.
        cfg: the run's knobs.
        device: where this rank computes.
        placement: which stage group runs each stage (default: stage ``s`` on
            stage group ``s``, which needs as many stage groups as stages).

    Raises:
        PlacementError: the model's stages do not fit the layout's stage groups.
    """

    def __init__(self, groups: ProcessGroups, model: StagedModel, optimizer_fn: OptimizerFn,
                 cfg: TrainConfig, device: Optional[torch.device] = None,
                 placement: Optional[Placement] = None) -> None:
        layout, c = groups.layout, groups.coord
        self.groups, self.cfg, self.model = groups, cfg, model
        self.device = device if device is not None else torch.device("cpu")
        self.per_pass = cfg.validate(layout.num_bundles, layout.widths)
        self.graph = model.graph
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

        def describe(local: int) -> str:
            return layout.coord(c.bundle * layout.bundle_size + local).tag()

        self.p2p = P2P(groups.bundle, len(self.graph.edges), self.device, cfg.timeout,
                       me=c.tag(), describe_peer=describe)
        n_slices = len(cfg.slices) if cfg.slices else 1
        self.p2p.check_tags(cfg.microbatches, n_slices)
        self.precision = precision.Precision(cfg.precision)
        self.executor = Executor(self.graph, layout, placement, c, self.modules, self.p2p,
                                 model.loss_fn, self.precision.autocast(self.device))
        self.plan = sched.build(cfg.schedule, self.graph, cfg.microbatches, placement, n_slices)[c.stage]
        self.eval_plan = sched.build_forward_only(self.graph, cfg.microbatches, placement)[c.stage]
        self.sync = GradSync(groups, placement, self.modules, cfg.fp16)
        self.sync.broadcast_parameters(self.modules)
        self.optimizer = optimizer_fn(self.sync.params)
        for g in self.optimizer.param_groups:  # the base of the schedule; saved with the groups
            g.setdefault("initial_lr", g["lr"])
        self.state = NamedState({s: model.stage_parameters(s, m) for s, m in self.modules.items()},
                                {s: model.stage_buffers(s, m) for s, m in self.modules.items()},
                                self.optimizer)
        self.step = 0
        self.log = get_logger()
        # the sink's loss counts once per row replica: on tensor rank 0
        self.is_sink = self.graph.sink in self.modules and c.tensor == 0
        self.sampler: Optional[Sampler] = None
        self._resume_sampler: Optional[dict[str, int]] = None
        self.stop_signal = 0  # set by a stop signal on this rank
        self.stop_agreed = False  # some rank had one when the last step ended: all stop
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite gradient
        self._last_checkpoint = -1  # the step of the last checkpoint written or resumed from
        #: written into every checkpoint's common file (e.g. the model's Hugging Face config for merging)
        self.checkpoint_extra: dict[str, Any] = dict(model.checkpoint_extra or {})

    def train_mode(self, on: bool) -> None:
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

    # -- one optimizer step ----------------------------------------------------
    def train_step(self, data: Dataset, indices: list[int]) -> float:
        """One optimizer step on the global batch ``indices``; returns the global mean loss."""
        cfg = self.cfg
        inject_failure(self.groups.world.Get_rank(), self.step + 1, "step")
        if len(indices) != cfg.batch_size:
            raise BatchError(f"a step needs {cfg.batch_size} rows, got {len(indices)}")
        self.train_mode(True)
        randomness.set_step(cfg.seed, self.step + 1)  # draws keyed by step, not by layout
        loss_sum = 0.0
        scale = self.precision.loss_scale  # fp16: the dynamic loss scale; else 1
        for a in range(cfg.accumulate):
            part = indices[a * self.per_pass:(a + 1) * self.per_pass]
            res = self.executor.run(self.plan, self.batch_fn(data, part, cfg.microbatches),
                                    cfg.microbatches, scale / (cfg.microbatches * cfg.accumulate),
                                    rows_fn=self.rows_fn(part, cfg.microbatches), slices=cfg.slices)
            loss_sum += res.loss_sum
        # Sync point: every microbatch of every pass has run backward on this rank's stages.
        with trace.span("sync", "sync"):
            self.sync.sync()
        if scale != 1.0:  # unscale the averaged gradients before the norm, the clip and the step
            for p in self.sync.params:
                if p.grad is not None:
                    p.grad.div_(scale)
        with trace.span("guard", "sync"):
            ok, norm = self.sync.guard(cfg.clip_grad, self.world_sum)
        if self.precision.scaler is not None:
            self.precision.scaler.update(ok)  # from the agreed norm: the same on every rank
        if ok:
            f = lr_schedule.factor(self.step + 1, cfg.steps, cfg.warmup, cfg.lr_schedule)
            for g in self.optimizer.param_groups:
                g["lr"] = g["initial_lr"] * f
            with trace.span("optimizer", "optimizer"):
                self.optimizer.step()
        else:
            self.skipped_steps += 1
            if self.groups.world.Get_rank() == 0:
                more = f"; loss scale now {self.precision.loss_scale:g}" if self.precision.scaler else ""
                self.log.warning(f"step {self.step + 1}: the gradient is not finite (norm {norm}); "
                                 f"step skipped ({self.skipped_steps} so far{more})")
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = self._step_end(loss_sum / (cfg.microbatches * cfg.accumulate))
        if not math.isfinite(loss):
            raise Diverged(f"the loss is {loss} at step {self.step}: training diverged; lower --lr, "
                           "or use --clip-grad, and start again (or --resume from an earlier checkpoint)")
        return loss

    def _step_end(self, replica_mean: float) -> float:
        """Global mean loss (over sink replicas and bundles), and agreement on stopping.

        One small allreduce over the world carries both: the loss (other ranks
        add 0) and whether any rank was asked to stop by a signal.
        """
        layout = self.groups.layout
        n = layout.num_bundles * layout.widths[self.placement.position_of(self.graph.sink)]
        total = self.world_sum([replica_mean if self.is_sink else 0.0, float(self.stop_signal)],
                               "the end-of-step allreduce of every rank")
        # Decide on the agreed sum only: a signal that lands after this allreduce
        # counts at the next step, on every rank alike.
        self.stop_agreed = bool(total[1])
        return float(total[0]) / n

    def world_sum(self, values: list[float], what: str) -> list[float]:
        """Sum a few numbers over every rank (buffer call: it releases the GIL), with a deadline."""
        import numpy as np
        from mpi4py import MPI

        mine = np.array(values, dtype=np.float64)
        total = np.empty_like(mine)
        req = self.groups.world.Iallreduce(mine, total, op=MPI.SUM)
        self.p2p.wait_all([req], lambda: what)
        return [float(v) for v in total]

    # -- evaluation (see :mod:`evaluation`) -------------------------------------
    def evaluate(self, data: Dataset, metric_fn: MetricFn, batch_size: int) -> tuple[float, int]:
        """Collective: the metric's mean over every row of ``data``, and the number of rows."""
        from .evaluation import evaluate

        return evaluate(self, data, metric_fn, batch_size)

    def predict(self, data: Dataset, batch_size: int,
                rows: Callable[[Any], torch.Tensor] = lambda out: out) -> Optional[torch.Tensor]:
        """Collective: the sink's output for every row of ``data``, in order, on world rank 0."""
        from .evaluation import predict

        return predict(self, data, batch_size, rows)

    # -- the loop ---------------------------------------------------------------
    def fit(self, data: Dataset, on_step: Optional[Callable[[int, float], None]] = None) -> list[float]:
        """Train until ``cfg.steps`` optimizer steps are done (continuing after a resume).

        Rank 0 draws progress and appends metrics. Checkpoints every
        ``checkpoint_every`` steps and at the end (when ``out`` is set). SIGTERM
        or SIGINT on any rank: every rank finishes the step, a checkpoint is
        written, and :class:`Stopped` is raised.
        """
        cfg, world = self.cfg, self.groups.world
        if self.sampler is None:
            self.sampler = Sampler(len(data), cfg.batch_size, cfg.seed)
            if self._resume_sampler is not None:
                self.sampler.load_state(self._resume_sampler)
        sampler = self.sampler
        losses: list[float] = []
        is_root = world.Get_rank() == 0
        bar = None
        if is_root and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step",
                       dynamic_ncols=True, mininterval=0.5)
        metrics = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if (is_root and cfg.out) else None
        t_start = t_last = time.perf_counter()
        with StopSignals(self):
            try:
                while self.step < cfg.steps:
                    loss = self.train_step(data, sampler.next())
                    losses.append(loss)
                    now = time.perf_counter()
                    sps = cfg.batch_size / max(now - t_last, 1e-9)
                    t_last = now
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{sps:.0f}", refresh=False)
                        bar.update(1)
                    if metrics is not None:
                        metrics.write(json.dumps({"step": self.step, "epoch": sampler.epoch,
                                                  "loss": loss, "samples_per_s": sps,
                                                  "elapsed_s": now - t_start}) + "\n")
                        metrics.flush()
                    if is_root and not cfg.progress and cfg.log_every and self.step % cfg.log_every == 0:
                        self.log.info(f"step {self.step}/{cfg.steps} loss {loss:.4f} {sps:.0f} samples/s")
                    if on_step is not None:
                        on_step(self.step, loss)
                    if self.stop_agreed:
                        path = self.save_checkpoint() if cfg.out else None
                        raise Stopped(self.stop_signal, self.step, path)
                    if cfg.out and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                if cfg.out and self.step and not self._saved_at(self.step):
                    self.save_checkpoint()
            finally:
                if bar is not None:
                    bar.close()
                if metrics is not None:
                    metrics.close()
        return losses

    # -- checkpoints --------------------------------------------------------------
    def _ckpt_root(self) -> str:
        assert self.cfg.out is not None
        return os.path.join(self.cfg.out, "checkpoints")

    def _saved_at(self, step: int) -> bool:
        """Whether a complete checkpoint of ``step`` exists: one this run wrote or resumed from.

        Decided from what every rank did alike, never from each rank's view of
        the disk (a file system that is not coherent would split the ranks).
        """
        return self._last_checkpoint == step

    def save_checkpoint(self) -> str:
        """Collective: write this step's checkpoint, by name, once per stage (see :mod:`state`)."""
        from .checkpoint import Manifest, save_collective

        lay, c, world = self.groups.layout, self.groups.coord, self.groups.world
        files, names = ({}, {}) if (c.bundle, c.replica) != (0, 0) else \
            self.state.files(c.tensor, lay.tensor)
        rngs = world.gather(rng_state(), root=0)
        if world.Get_rank() == 0:
            files[COMMON] = {"model": self.cfg.model_name, "step": self.step, "rng": rngs,
                             "sampler": self.sampler.state() if self.sampler else self._resume_sampler,
                             "hyper": self.state.hyperparameters(),
                             "scaler": self.precision.scaler.state() if self.precision.scaler else None,
                             "extra": self.checkpoint_extra}
        facts = Manifest(self.step, self.cfg.model_name, lay.world_size, lay.widths, {}, lay.tensor,
                         {}, self.placement.positions)
        path = save_collective(world, self._ckpt_root(), self.step, facts, files, names, self.cfg.keep,
                               lambda: inject_failure(world.Get_rank(), self.step, "ckpt"))
        if world.Get_rank() == 0:
            self.log.info(f"checkpoint step {self.step} written to {path}")
        self._last_checkpoint = self.step
        return path

    def resume(self, where: str) -> Optional[str]:
        """Collective: load the newest complete checkpoint under ``where`` (or that one directory).

        The checkpoint may come from any layout: parameters and optimizer state
        are found by name and resharded. RNG states come back only when the
        layout is the same (then the resume is exact bit for bit).

        Returns:
            The directory loaded, or None when there is none yet.

        Raises:
            CheckpointError: the named checkpoint is corrupt, or belongs to another run/model.
        """
        from .checkpoint import CheckpointError, Manifest, load_file, resolve_resume

        world, lay = self.groups.world, self.groups.layout
        path, warnings, error = resolve_resume(world, where)
        if world.Get_rank() == 0:
            for w in warnings:
                self.log.warning(w)
        if error:
            raise CheckpointError(error)
        if path is None:
            return None
        manifest = Manifest.read(os.path.join(path, "manifest.json"))
        common = load_file(path, COMMON)
        check_model(self.cfg.model_name, str(common["model"]))
        self.state.load(path, manifest, common["hyper"])
        same = (manifest.world_size, manifest.widths, manifest.tensor, manifest.placement) == \
            (lay.world_size, lay.widths, lay.tensor, self.placement.positions)
        if same:
            set_rng_state(common["rng"][world.Get_rank()])
        self.sync.broadcast_optimizer_state(self.optimizer)  # every copy continues from bundle 0's
        if self.precision.scaler is not None and common.get("scaler"):
            self.precision.scaler.load_state(common["scaler"])
        self.step = int(common["step"])
        self._last_checkpoint = self.step
        self._resume_sampler = common["sampler"]
        self.sampler = None
        return path

    # -- parameters --------------------------------------------------------------
    def named_parameters(self) -> dict[str, torch.Tensor]:
        """This rank's parameters by full-model name (CPU copies; a tie under each holder's name)."""
        return {n: p.detach().cpu().clone()
                for names in self.state.named_params.values() for n, p in names.items()}

    def gather_parameters(self) -> Optional[dict[str, torch.Tensor]]:
        """Collective: the whole model's parameters on world rank 0, shards joined."""
        c = self.groups.coord
        mine: dict[str, tuple[torch.Tensor, Optional[Sharded]]] = {}
        if (c.bundle, c.replica) == (0, 0):
            for names in self.state.named_params.values():
                for n, p in names.items():
                    shard = shard_of(owner_of(p))
                    if shard is None and c.tensor != 0:
                        continue
                    mine[n] = (p.detach().cpu().clone(), shard)
        parts = self.groups.world.gather(mine, root=0)
        if parts is None:
            return None
        pieces: dict[str, list[tuple[int, torch.Tensor, Optional[Sharded]]]] = {}
        for part in parts:
            for n, (t, shard) in part.items():
                pieces.setdefault(n, []).append((shard.index if shard else 0, t, shard))
        out: dict[str, torch.Tensor] = {}
        for n, ps in pieces.items():
            ps.sort(key=lambda x: x[0])
            shard = ps[0][2]
            out[n] = ps[0][1] if shard is None else join([t for _, t, _ in ps], shard.dim, shard.parts)
        return out

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        if self.groups.world.Get_rank() == 0 and self.cfg.out:
            with open(os.path.join(self.cfg.out, name), "w") as f:
                json.dump(obj, f, indent=2)

    def config_dict(self) -> dict[str, Any]:
        lay = self.groups.layout
        return {**asdict(self.cfg), "widths": list(lay.widths), "tensor": lay.tensor,
                "world_size": lay.world_size, "placement": list(self.placement.positions)}


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor) or hasattr(x, "to"):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(t, device) for t in x)
    return x
