"""The training loop every model uses: step the engine, agree on the loss and on stopping, report.

What one rank builds (stages, schedules, sync, optimizer) is the :class:`Engine`
in :mod:`engine`; evaluation and prediction live in :mod:`evaluation`, the
gradient guard next to the averaging in :mod:`gradsync`, checkpoint save and
resume in :mod:`checkpointing` (their contents in :mod:`state`).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Optional

import torch

from .. import waits
from ..comm.groups import ProcessGroups
from ..config import Config
from ..layout.placement import Placement
from ..layout.rows import BatchError
from ..log import get_logger
from ..parallel import randomness
from ..parallel.staged import StagedModel
from ..pipeline import trace
from . import checkpointing, evaluation, lr_schedule, memory
from .background_save import BackgroundWriter
from .data import Dataset, Sampler
from .engine import Engine, EngineParts, OptimizerFn
from .evaluation import MetricFn
from .faults import inject_failure
from .stopping import Stopped, StopSignals

__all__ = ["Trainer", "MetricFn", "Diverged"]


class Diverged(RuntimeError):
    """The agreed loss is not finite: training cannot continue from here."""


class Trainer(EngineParts):
    """Runs one rank's share of training: the loop over its :class:`Engine`.

    The engine's parts (``modules``, ``executor``, ``optimizer``, ``state``, ...)
    read as the trainer's own (:class:`EngineParts`).

    Args and Raises: those of :class:`Engine`, which it builds (``cfg`` is the whole
    :class:`~hvdhybrid.config.Config`; ``hvdhybrid.TrainConfig(steps=..., ...)`` makes one).
    """

    def __init__(self, groups: ProcessGroups, model: StagedModel, optimizer_fn: OptimizerFn,
                 cfg: Config, device: Optional[torch.device] = None,
                 placement: Optional[Placement] = None) -> None:
        #: what this rank built: stages, executor, plans, sync, optimizer, state by name
        self.engine = Engine(groups, model, optimizer_fn, cfg, device, placement)
        self.step = 0
        self.log = get_logger()
        self.sampler: Optional[Sampler] = None
        self._resume_sampler: Optional[dict[str, int]] = None
        self.stop_signal = 0  # set by a stop signal on this rank
        self.stop_agreed = False  # some rank had one when the last step ended: all stop
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite gradient
        self._last_checkpoint = -1  # the step of the last checkpoint written or resumed from
        w = groups.world
        self.writer = BackgroundWriter(w.Get_rank(), w.Get_size(), cfg.comm.timeout) \
            if cfg.run.checkpoint_async else None  # the periodic checkpoints, written by a thread
        self.grad_bytes = 0  # the largest gradient bytes after a synchronisation (memory accounting)

    def _sync_what(self) -> str:
        """What the gradient sync waits for, in a hang report."""
        g = self.groups
        return (f"the gradient sync of stage group {g.coord.stage} (row, tie and data groups; across "
                f"{g.layout.num_bundles} bundles by Horovod)")

    # -- one optimizer step ----------------------------------------------------
    def train_step(self, data: Dataset, indices: list[int]) -> float:
        """One optimizer step on the global batch ``indices``; returns the global mean loss."""
        cfg = self.cfg
        inject_failure(self.groups.world.Get_rank(), self.step + 1, "step")
        if len(indices) != cfg.optim.batch_size:
            raise BatchError(f"a step needs {cfg.optim.batch_size} rows, got {len(indices)}")
        self.train_mode(True)
        randomness.set_step(cfg.run.seed, self.step + 1)  # draws keyed by step, not by layout
        loss_sum = 0.0
        scale = self.precision.loss_scale  # fp16: the dynamic loss scale; else 1
        mbs, acc = cfg.pipeline.microbatches, cfg.optim.accumulate
        for a in range(acc):
            part = indices[a * self.per_pass:(a + 1) * self.per_pass]
            res = self.executor.run(self.plan, self.batch_fn(data, part, mbs), mbs, scale / (mbs * acc),
                                    rows_fn=self.rows_fn(part, mbs), slices=cfg.pipeline.slices,
                                    last_pass=a == acc - 1)
            loss_sum += res.loss_sum
        # Sync point: every microbatch of every pass has run backward on this rank's stages.
        with trace.span("sync", "sync"), waits.waiting(self._sync_what):
            self.sync.sync()
        if scale != 1.0:  # unscale the averaged gradients before the norm, the clip and the step
            for grad in self.sync.grad_tensors():
                grad.div_(scale)
        with trace.span("guard", "sync"):
            ok, norm = self.sync.guard(cfg.optim.clip_grad, self.world_sum)
        if self.precision.scaler is not None:
            self.precision.scaler.update(ok)  # from the agreed norm: the same on every rank
        if ok:
            f = lr_schedule.factor(self.step + 1, cfg.optim.steps, cfg.optim.warmup, cfg.optim.lr_schedule)
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
        self.grad_bytes = max(self.grad_bytes, memory.tensor_bytes(self.sync.grad_tensors()))
        self.optimizer.zero_grad(set_to_none=True)
        self.sync.average_statistics(self.engine.statistics)
        self.step += 1
        loss = self._step_end(loss_sum / (cfg.pipeline.microbatches * cfg.optim.accumulate))
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

    # -- evaluation (see :mod:`evaluation`) -------------------------------------
    def evaluate(self, data: Dataset, metric_fn: MetricFn, batch_size: int) -> tuple[float, int]:
        """Collective: the metric's mean over every row of ``data``, and the number of rows."""
        return evaluation.evaluate(self.engine, data, metric_fn, batch_size)

    def predict(self, data: Dataset, batch_size: int,
                rows: Callable[[Any], torch.Tensor] = lambda out: out) -> Optional[torch.Tensor]:
        """Collective: the sink's output for every row of ``data``, in order, on world rank 0."""
        return evaluation.predict(self.engine, data, batch_size, rows)

    # -- the loop ---------------------------------------------------------------
    def fit(self, data: Dataset, on_step: Optional[Callable[[int, float], None]] = None) -> list[float]:
        """Train until ``cfg.optim.steps`` optimizer steps are done (continuing after a resume).

        Rank 0 draws progress and appends metrics. Checkpoints every
        ``checkpoint_every`` steps and at the end (when ``out`` is set). SIGTERM
        or SIGINT on any rank: every rank finishes the step, a checkpoint is
        written, and :class:`Stopped` is raised.
        """
        cfg, world = self.cfg, self.groups.world
        run = cfg.run
        if self.sampler is None:
            make = getattr(data, "make_sampler", None)  # a streamed set orders its own
            self.sampler = Sampler(len(data), cfg.optim.batch_size, cfg.run.seed) if make is None \
                else make(cfg.optim.batch_size, cfg.run.seed)
            if self._resume_sampler is not None:
                self.sampler.load_state(self._resume_sampler)
        sampler = self.sampler
        losses: list[float] = []
        is_root = world.Get_rank() == 0
        bar = None
        if is_root and cfg.run.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.optim.steps, initial=self.step, desc="train", unit="step",
                       dynamic_ncols=True, mininterval=0.5)
        metrics = open(os.path.join(cfg.run.out, "metrics.jsonl"), "a") if (is_root and cfg.run.out) else None
        t_start = t_last = time.perf_counter()
        first = self.step
        with StopSignals(self):
            try:
                while self.step < cfg.optim.steps:
                    indices = sampler.next()
                    self._prefetch(data, indices, sampler)
                    loss = self.train_step(data, indices)
                    losses.append(loss)
                    now = time.perf_counter()
                    sps = cfg.optim.batch_size / max(now - t_last, 1e-9)
                    t_last = now
                    waited = data_wait(data, now - t_start)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{sps:.0f}", refresh=False,
                                        **({} if waited is None else {"data_wait": f"{waited:.0%}"}))
                        bar.update(1)
                    if metrics is not None:
                        metrics.write(json.dumps({"step": self.step, "epoch": sampler.epoch,
                                                  "loss": loss, "samples_per_s": sps,
                                                  **({} if waited is None else {"data_wait": waited}),
                                                  "elapsed_s": now - t_start, "time": time.time()}) + "\n")
                        metrics.flush()
                    if is_root and not run.progress and run.log_every and self.step % run.log_every == 0:
                        wait = "" if waited is None else f", {waited:.0%} of the time waiting for data"
                        more = getattr(data, "progress", None)  # the data set's own figures
                        wait += f", {more()}" if more is not None else ""
                        eta = (now - t_start) / (self.step - first) * (cfg.optim.steps - self.step)
                        self.log.info(f"step {self.step}/{cfg.optim.steps} loss {loss:.4f} "
                                      f"{sps:.0f} samples/s{wait}, eta {_clock(eta)}")
                    if on_step is not None:
                        on_step(self.step, loss)
                    if self.stop_agreed:
                        path = self.save_checkpoint() if cfg.run.out else None
                        raise Stopped(self.stop_signal, self.step, path)
                    if cfg.run.out and cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0:
                        self.save_checkpoint(background=self.step < cfg.optim.steps)
                if cfg.run.out and self.step and not self._saved_at(self.step):
                    self.save_checkpoint()
                self.flush_checkpoints()
            finally:
                if bar is not None:
                    bar.close()
                if metrics is not None:
                    metrics.close()
        return losses

    def _prefetch(self, data: Dataset, indices: list[int], sampler: Sampler) -> None:
        """Hand a data set that featurises ahead (``prefetch``) this rank's rows of this step (those it
        does not have yet go first) and of the next one."""
        prefetch = getattr(data, "prefetch", None)
        peek = getattr(sampler, "peek", None)
        if prefetch is None or peek is None:
            return
        mbs, acc = self.cfg.pipeline.microbatches, self.cfg.optim.accumulate

        def rows(batch: list[int]) -> list[list[int]]:
            parts = [batch[a * self.per_pass:(a + 1) * self.per_pass] for a in range(acc)]
            return [r for part in parts for mb in range(mbs) if (r := self.rows_fn(part, mbs)(mb))]
        prefetch(self.cfg.run.seed, self.step + 1, rows(indices))
        if self.step + 1 < self.cfg.optim.steps:
            prefetch(self.cfg.run.seed, self.step + 2, rows(peek()))

    # -- checkpoints and parameters (see :mod:`checkpointing`) ---------------------
    def _saved_at(self, step: int) -> bool:
        """Whether a complete checkpoint of ``step`` exists: one this run wrote or resumed from.

        Decided from what every rank did alike, never from each rank's view of
        the disk (a file system that is not coherent would split the ranks).
        """
        return self._last_checkpoint == step

    def save_checkpoint(self, background: bool = False) -> str:
        """Collective: write this step's checkpoint, by name, once per stage (see :mod:`checkpointing`);
        ``background`` (with ``--checkpoint-async``): a copy of the state, written by a thread."""
        sampler = self.sampler.state() if self.sampler else self._resume_sampler
        if not background:
            self.flush_checkpoints()
        writer = self.writer if background else None
        path = checkpointing.save(self.engine, self.step, sampler, writer)
        self._last_checkpoint = self.step
        return path

    def flush_checkpoints(self) -> None:
        """Wait for the checkpoint being written in the background, if any (raises what it failed with)."""
        if self.writer is not None:
            self.writer.wait()

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
        got = checkpointing.resume(self.engine, where)
        if got is None:
            return None
        self.step = got.step
        self._last_checkpoint = self.step
        self._resume_sampler = got.sampler
        self.sampler = None
        return got.path

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """This rank's parameters by full-model name (CPU copies; a tie under each holder's name)."""
        return checkpointing.named_parameters(self.engine.state)

    def gather_parameters(self) -> Optional[dict[str, torch.Tensor]]:
        """Collective: the whole model's parameters on world rank 0, shards joined."""
        return checkpointing.gather_parameters(self.engine)

    # -- run records ----------------------------------------------------------------
    def release_optimizer_state(self) -> None:
        """Drop the optimizer's state and the gradients, once training is over and checkpointed (a later
        :meth:`fit` starts its moments afresh unless it resumes)."""
        getattr(self.optimizer, "inner", self.optimizer).state.clear()
        self.optimizer.zero_grad(set_to_none=True)

    def memory(self) -> dict[str, int]:
        """This rank's bytes: parameters, gradients, optimizer state, saved activations (peak), RSS (peak)."""
        return memory.memory_report(self.engine, self.grad_bytes)

    def write_json(self, name: str, obj: Any) -> None:
        if self.groups.world.Get_rank() == 0 and self.cfg.run.out:
            with open(os.path.join(self.cfg.run.out, name), "w") as f:
                json.dump(obj, f, indent=2)

    def config_dict(self) -> dict[str, Any]:
        """What ``config.json`` holds: the model, the config tree, and the layout it ran at."""
        lay = self.groups.layout
        return {"model": self.cfg.run.model_name, **self.cfg.to_dict(),
                "layout": {"world_size": lay.world_size, "widths": list(lay.widths), "tensor": lay.tensor,
                           "placement": list(self.placement.positions)}}


def data_wait(data: Dataset, elapsed: float) -> Optional[float]:
    """The share of ``elapsed`` this rank waited for a data set that counts it (``wait_s``), else None."""
    waited = getattr(data, "wait_s", None)
    return None if waited is None else float(waited) / max(elapsed, 1e-9)


def _clock(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 \
        else f"{s}s"
