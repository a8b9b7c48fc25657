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

from . import schedule as sched
from .data import Dataset, Sampler
from .executor import Executor
from .gradsync import GradSync
from .groups import ProcessGroups
from .log import get_logger
from .p2p import P2P
from .slicing import BatchError, check_batch, replica_rows
from .staged import StagedModel

__all__ = ["TrainConfig", "Trainer", "MetricFn"]

# "RANK:STEP": raise in that rank at that step; for the failure tests only
_INJECT = os.environ.get("HVDHYBRID_INJECT_FAILURE", "")

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

    def validate(self, num_bundles: int, widths: tuple[int, ...]) -> int:
        """Check the batch arithmetic; return rows per pass (batch_size / accumulate).

        Raises:
            BatchError: naming the sizes and a batch size that works.
        """
        if self.steps < 0:
            raise BatchError(f"--steps must be >= 0, got {self.steps}")
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
        self.p2p = P2P(groups.bundle, len(self.graph.edges), self.device)
        self.p2p.check_tags(cfg.microbatches)
        self.executor = Executor(self.graph, layout, c, self.module, self.p2p, model.loss_fn)
        self.plan = sched.build(cfg.schedule, self.graph, cfg.microbatches)[c.stage]
        self.sync = GradSync(groups, self.module, cfg.fp16)
        self.sync.broadcast_parameters(self.module)
        self.optimizer = optimizer_fn(self.module.parameters())
        self.step = 0
        self.log = get_logger()
        self.is_sink = c.stage == self.graph.sink

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
        if _INJECT == f"{self.groups.world.Get_rank()}:{self.step + 1}":
            raise RuntimeError(f"injected failure at step {self.step + 1} (HVDHYBRID_INJECT_FAILURE)")
        if len(indices) != cfg.batch_size:
            raise BatchError(f"a step needs {cfg.batch_size} rows, got {len(indices)}")
        self.module.train()
        loss_sum = 0.0
        for a in range(cfg.accumulate):
            part = indices[a * self.per_pass:(a + 1) * self.per_pass]
            res = self.executor.run(self.plan, self._batch_fn(data, part, cfg.microbatches),
                                    cfg.microbatches, 1.0 / (cfg.microbatches * cfg.accumulate))
            loss_sum += res.loss_sum
        # Sync point: every microbatch of every pass has run backward on this stage.
        self.sync.sync()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return self._global_mean(loss_sum / (cfg.microbatches * cfg.accumulate))

    def _global_mean(self, replica_mean: float) -> float:
        """Mean over sink replicas and bundles (non-sink ranks contribute 0)."""
        from mpi4py import MPI

        layout = self.groups.layout
        n = layout.num_bundles * layout.widths[self.graph.sink]
        total = self.groups.world.allreduce(replica_mean if self.is_sink else 0.0, op=MPI.SUM)
        return float(total) / n

    # -- evaluation -------------------------------------------------------------
    def evaluate(self, data: Dataset, metric_fn: MetricFn, batch_size: int) -> tuple[float, int]:
        """Forward-only pass over ``data`` in full batches; returns (metric mean, rows seen).

        Batches are multiples of (bundles x microbatches x stage widths); only
        the last ``len(data) mod`` that unit rows are left out.
        """
        from mpi4py import MPI

        layout = self.groups.layout
        unit = layout.num_bundles * self.cfg.microbatches * math.lcm(*layout.widths)
        bs = max(unit, batch_size // unit * unit)
        usable = len(data) // unit * unit
        plan = sched.forward_only(self.graph, self.groups.coord.stage, self.cfg.microbatches)
        self.module.eval()
        total, count = 0.0, 0
        for start in range(0, usable, bs):
            idx = list(range(start, min(start + bs, usable)))
            with torch.no_grad():
                res = self.executor.run(plan, self._batch_fn(data, idx, self.cfg.microbatches),
                                        self.cfg.microbatches, train=False)
            for out, y in res.outputs:
                s, n = metric_fn(out, y)
                total, count = total + s, count + n
        world = self.groups.world
        total = world.allreduce(total if self.is_sink else 0.0, op=MPI.SUM)
        count = world.allreduce(count if self.is_sink else 0, op=MPI.SUM)
        return (total / count if count else float("nan")), int(count)

    # -- the loop ---------------------------------------------------------------
    def fit(self, data: Dataset, on_step: Optional[Callable[[int, float], None]] = None) -> list[float]:
        """Run ``cfg.steps`` optimizer steps; rank 0 draws progress and writes metrics."""
        cfg, world = self.cfg, self.groups.world
        sampler = Sampler(len(data), cfg.batch_size, cfg.seed)
        losses = []
        is_root = world.Get_rank() == 0
        bar = None
        if is_root and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, desc="train", unit="step", dynamic_ncols=True,
                       mininterval=0.5)
        metrics = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if (is_root and cfg.out) else None
        t_start = t_last = time.perf_counter()
        try:
            for _ in range(cfg.steps):
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
        finally:
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
        return losses

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
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(t, device) for t in x)
    return x

