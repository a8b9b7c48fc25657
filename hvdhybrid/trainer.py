"""The training loop every model uses: shard, schedule, sync, step, report."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from . import randomness
from . import schedule as sched
from .data import Dataset, Sampler
from .executor import Executor
from .faults import inject_failure
from .gradsync import GradSync
from .groups import ProcessGroups
from .log import get_logger
from .p2p import P2P
from .slicing import BatchError, check_batch, replica_rows
from .staged import StagedModel
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
        model: the staged model; this rank keeps ``model.stages[its stage]``.
        optimizer_fn: builds the optimizer from this stage's parameters.
        cfg: the run's knobs.
        device: where this rank computes.
    """

    def __init__(self, groups: ProcessGroups, model: StagedModel, optimizer_fn: OptimizerFn,
                 cfg: TrainConfig, device: Optional[torch.device] = None) -> None:
        layout, c = groups.layout, groups.coord
        self.groups, self.cfg, self.model = groups, cfg, model
        self.device = device if device is not None else torch.device("cpu")
        self.per_pass = cfg.validate(layout.num_bundles, layout.widths)
        self.graph = model.graph
        self.module = model.stages[c.stage].to(self.device)
        def describe(local: int) -> str:
            return layout.coord(c.bundle * layout.bundle_size + local).tag()

        self.p2p = P2P(groups.bundle, len(self.graph.edges), self.device, cfg.timeout,
                       me=c.tag(), describe_peer=describe)
        self.p2p.check_tags(cfg.microbatches)
        self.executor = Executor(self.graph, layout, c, self.module, self.p2p, model.loss_fn)
        self.plan = sched.build(cfg.schedule, self.graph, cfg.microbatches)[c.stage]
        self.sync = GradSync(groups, self.module, cfg.fp16)
        self.sync.broadcast_parameters(self.module)
        self.optimizer = optimizer_fn(self.module.parameters())
        self.step = 0
        self.log = get_logger()
        self.is_sink = c.stage == self.graph.sink
        self.sampler: Optional[Sampler] = None
        self._resume_sampler: Optional[dict[str, int]] = None
        self.stop_signal = 0  # set by a stop signal on this rank
        self.stop_agreed = False  # some rank had one when the last step ended: all stop
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite gradient

    # -- data ------------------------------------------------------------------
    def _batch_fn(self, data: Dataset, indices: list[int], microbatches: int) -> Callable[[int], Any]:
        layout, c = self.groups.layout, self.groups.coord
        width = layout.widths[c.stage]

        def fn(mb: int) -> tuple[Any, Any]:
            lo, hi = replica_rows(len(indices), layout.num_bundles, c.bundle, microbatches,
                                  mb, width, c.replica)
            x, y = data.batch(indices[lo:hi])
            return _to(x, self.device), _to(y, self.device)
        return fn

    # -- one optimizer step ----------------------------------------------------
    def train_step(self, data: Dataset, indices: list[int]) -> float:
        """One optimizer step on the global batch ``indices``; returns the global mean loss."""
        cfg = self.cfg
        inject_failure(self.groups.world.Get_rank(), self.step + 1, "step")
        if len(indices) != cfg.batch_size:
            raise BatchError(f"a step needs {cfg.batch_size} rows, got {len(indices)}")
        self.module.train()
        randomness.set_step(cfg.seed, self.step + 1)  # draws keyed by step, not by layout
        loss_sum = 0.0
        for a in range(cfg.accumulate):
            part = indices[a * self.per_pass:(a + 1) * self.per_pass]
            res = self.executor.run(self.plan, self._batch_fn(data, part, cfg.microbatches),
                                    cfg.microbatches, 1.0 / (cfg.microbatches * cfg.accumulate))
            loss_sum += res.loss_sum
        # Sync point: every microbatch of every pass has run backward on this stage.
        self.sync.sync()
        if self._guard_gradients():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = self._step_end(loss_sum / (cfg.microbatches * cfg.accumulate))
        if not math.isfinite(loss):
            raise Diverged(f"the loss is {loss} at step {self.step}: training diverged; lower --lr, "
                           "or use --clip-grad, and start again (or --resume from an earlier checkpoint)")
        return loss

    def _guard_gradients(self) -> bool:
        """Collective: the whole model's gradient norm; skip a non-finite step, clip a large one.

        After :meth:`GradSync.sync` every replica of a stage holds the same
        (averaged) gradient, so each rank adds its squared norm divided by its
        stage's width and the number of bundles: the world sum is the squared
        norm one process would compute. A non-finite norm (float16 compression
        overflows beyond 65504) skips the optimizer step on every rank, as a
        mixed-precision loss scaler does, and says so.
        """
        layout, c = self.groups.layout, self.groups.coord
        grads = [p.grad for p in self.sync.params if p.grad is not None]
        sq = sum(float(g.detach().double().pow(2).sum()) for g in grads)
        total = self._world_sum([sq / (layout.widths[c.stage] * layout.num_bundles)],
                                "the gradient-norm allreduce of every rank")[0]
        if not math.isfinite(total):
            self.skipped_steps += 1
            if self.groups.world.Get_rank() == 0:
                self.log.warning(f"step {self.step + 1}: the gradient is not finite (norm {total}); "
                                 f"step skipped ({self.skipped_steps} so far)")
            return False
        norm = math.sqrt(total)
        if self.cfg.clip_grad > 0 and norm > self.cfg.clip_grad:
            coef = self.cfg.clip_grad / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
            for g in grads:
                g.mul_(coef)
        return True

    def _step_end(self, replica_mean: float) -> float:
        """Global mean loss (over sink replicas and bundles), and agreement on stopping.

        One small allreduce over the world carries both: the loss (non-sink
        ranks add 0) and whether any rank was asked to stop by a signal.
        """
        layout = self.groups.layout
        n = layout.num_bundles * layout.widths[self.graph.sink]
        total = self._world_sum([replica_mean if self.is_sink else 0.0, float(self.stop_signal)],
                                "the end-of-step allreduce of every rank")
        # Decide on the agreed sum only: a signal that lands after this allreduce
        # counts at the next step, on every rank alike.
        self.stop_agreed = bool(total[1])
        return float(total[0]) / n

    def _world_sum(self, values: list[float], what: str) -> list[float]:
        """Sum a few numbers over every rank (buffer call: it releases the GIL), with a deadline."""
        import numpy as np
        from mpi4py import MPI

        mine = np.array(values, dtype=np.float64)
        total = np.empty_like(mine)
        req = self.groups.world.Iallreduce(mine, total, op=MPI.SUM)
        self.p2p.wait_all([req], lambda: what)
        return [float(v) for v in total]

    # -- evaluation -------------------------------------------------------------
    def evaluate(self, data: Dataset, metric_fn: MetricFn, batch_size: int) -> tuple[float, int]:
        """Forward-only pass over ``data`` in full batches; returns (metric mean, rows seen).

        Batches are multiples of (bundles x microbatches x stage widths); only
        the last ``len(data) mod`` that unit rows are left out.
        """

        layout = self.groups.layout
        unit = layout.num_bundles * self.cfg.microbatches * math.lcm(*layout.widths)
        bs = max(unit, batch_size // unit * unit)
        usable = len(data) // unit * unit
        plan = sched.forward_only(self.graph, self.groups.coord.stage, self.cfg.microbatches)
        self.module.eval()
        randomness.set_step(self.cfg.seed, 0)  # evaluation draws (e.g. masks) never change
        total, count = 0.0, 0
        for start in range(0, usable, bs):
            idx = list(range(start, min(start + bs, usable)))
            with torch.no_grad():
                res = self.executor.run(plan, self._batch_fn(data, idx, self.cfg.microbatches),
                                        self.cfg.microbatches, train=False)
            for out, y in res.outputs:
                s, n = metric_fn(out, y)
                total, count = total + s, count + n
        total, n_rows = self._world_sum([total, count] if self.is_sink else [0.0, 0.0],
                                        "the evaluation allreduce of every rank")
        count = int(n_rows)
        return (total / count if count else float("nan")), count

    def predict(self, data: Dataset, batch_size: int,
                rows: Callable[[Any], torch.Tensor] = lambda out: out) -> Optional[torch.Tensor]:
        """Collective: the sink's output for every row of ``data``, in order, on world rank 0.

        ``rows(sink output)`` turns one microbatch's output into a tensor with
        one row per data row. Unlike :meth:`evaluate`, no row is left out: the
        last batch is padded (with copies of the last row) to a whole unit and
        the padding is dropped again. Other ranks get None.
        """
        layout, c, mbs = self.groups.layout, self.groups.coord, self.cfg.microbatches
        unit = layout.num_bundles * mbs * math.lcm(*layout.widths)
        n = len(data)
        if n == 0:
            raise BatchError("predict: the data set is empty")
        indices = list(range(n)) + [n - 1] * (-n % unit)
        bs = max(unit, batch_size // unit * unit)
        plan = sched.forward_only(self.graph, c.stage, mbs)
        width = layout.widths[self.graph.sink]
        self.module.eval()
        randomness.set_step(self.cfg.seed, 0)
        mine: list[tuple[int, torch.Tensor]] = []
        for start in range(0, len(indices), bs):
            idx = indices[start:start + bs]
            with torch.no_grad():
                res = self.executor.run(plan, self._batch_fn(data, idx, mbs), mbs, train=False)
            for mb, (out, _targets) in enumerate(res.outputs):
                lo, hi = replica_rows(len(idx), layout.num_bundles, c.bundle, mbs, mb, width, c.replica)
                got = rows(out).detach().cpu()
                if got.shape[0] != hi - lo:
                    raise ValueError(f"predict: rows() gave {got.shape[0]} rows for {hi - lo} data rows")
                mine.append((start + lo, got))
        parts = self.groups.world.gather(mine, root=0)
        if parts is None:
            return None
        pieces = sorted((p for part in parts for p in part), key=lambda p: p[0])
        at = 0
        for start, t in pieces:  # the sink replicas' rows must tile the data exactly once
            assert start == at, f"predict: rows from {start}, expected {at}"
            at += t.shape[0]
        assert at == len(indices), (at, len(indices))
        return torch.cat([t for _, t in pieces])[:n]

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
        from .checkpoint import step_dir

        return os.path.exists(os.path.join(step_dir(self._ckpt_root(), step), "manifest.json"))

    def state_dict(self) -> dict[str, Any]:
        """Everything this rank needs to continue exactly where it is."""
        c, layout = self.groups.coord, self.groups.layout
        return {"model": self.cfg.model_name, "rank": c.rank, "bundle": c.bundle, "stage": c.stage,
                "replica": c.replica, "widths": list(layout.widths), "world_size": layout.world_size,
                "step": self.step, "params": self.module.state_dict(),
                "full_names": list(self.model.stage_parameters(c.stage, self.module)),
                "optimizer": self.optimizer.state_dict(), "rng": _rng_state(),
                "sampler": self.sampler.state() if self.sampler else self._resume_sampler}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from this rank's shard; raises CheckpointError if it belongs to another run."""
        from .checkpoint import CheckpointError

        layout = self.groups.layout
        if state.get("model") != self.cfg.model_name:
            raise CheckpointError(f"the checkpoint is of model {state.get('model')!r}, "
                                  f"this run trains {self.cfg.model_name!r}")
        if (tuple(state["widths"]), state["world_size"]) != (layout.widths, layout.world_size):
            raise CheckpointError(
                f"the checkpoint was written by {state['world_size']} ranks with stage widths "
                f"{state['widths']}; this run has {layout.world_size} ranks with widths "
                f"{list(layout.widths)}. Resharding to another layout is not supported yet: "
                "resume with the same -np and --stages/--bundle-shape")
        try:
            self.module.load_state_dict(state["params"])
        except RuntimeError as e:
            raise CheckpointError(f"the checkpoint does not fit this model: {str(e)[:300]}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self._resume_sampler = state["sampler"]
        self.sampler = None

    def save_checkpoint(self) -> str:
        """Collective: write this step's checkpoint (see :mod:`checkpoint`)."""
        from .checkpoint import save_collective

        path = save_collective(self.groups.world, self._ckpt_root(), self.step, self.cfg.model_name,
                               self.groups.layout.widths, self.state_dict(), self.cfg.keep,
                               lambda: inject_failure(self.groups.world.Get_rank(), self.step, "ckpt"))
        if self.groups.world.Get_rank() == 0:
            self.log.info(f"checkpoint step {self.step} written to {path}")
        return path

    def resume(self, where: str) -> Optional[str]:
        """Collective: load the newest complete checkpoint under ``where`` (or that one directory).

        Returns:
            The directory loaded, or None when there is none yet.

        Raises:
            CheckpointError: the named checkpoint is corrupt, or belongs to another run/layout.
        """
        from .checkpoint import CheckpointError, load_shard, resolve_resume

        path, warnings, error = resolve_resume(self.groups.world, where)
        if self.groups.world.Get_rank() == 0:
            for w in warnings:
                self.log.warning(w)
        if error:
            raise CheckpointError(error)
        if path is None:
            return None
        self.load_state_dict(load_shard(path, self.groups.world.Get_rank()))
        return path

    # -- parameters --------------------------------------------------------------
    def named_parameters(self) -> dict[str, torch.Tensor]:
        """This stage's parameters by full-model name (CPU copies)."""
        return {n: p.detach().cpu().clone()
                for n, p in self.model.stage_parameters(self.groups.coord.stage, self.module).items()}

    def gather_parameters(self) -> Optional[dict[str, torch.Tensor]]:
        """The whole model's parameters on world rank 0 (from bundle 0, replica 0 of each stage)."""
        c = self.groups.coord
        mine = self.named_parameters() if (c.bundle == 0 and c.replica == 0) else {}
        parts = self.groups.world.gather(mine, root=0)
        if parts is None:
            return None
        out: dict[str, torch.Tensor] = {}
        for p in parts:
            out.update(p)
        return out

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        if self.groups.world.Get_rank() == 0 and self.cfg.out:
            with open(os.path.join(self.cfg.out, name), "w") as f:
                json.dump(obj, f, indent=2)

    def config_dict(self) -> dict[str, Any]:
        return {**asdict(self.cfg), "widths": list(self.groups.layout.widths),
                "world_size": self.groups.layout.world_size}


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor) or hasattr(x, "to"):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(t, device) for t in x)
    return x



def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(s: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
