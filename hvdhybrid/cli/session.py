"""One training run, from user input to results: validate, agree across ranks, train, report.

Phases, and what a failure in each looks like to the user:

1. *setup* (no groups yet): every check of user input. Ranks agree with one
   ``allgather`` (:func:`agreed`); on any failure one line is printed by one rank and every
   rank exits with code 2. Nothing is written.
2. *run*: groups, (resume), training, evaluation. An exception prints the
   rank's tag and what happened, then ``MPI_Abort`` ends every rank.
   SIGTERM/SIGINT: the step finishes, a checkpoint is written, exit 128+signal.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import click

from ..comm.agreement import agreed, world
from ..errors import UserError
from ..layout.placement import Placement, PlacementError
from ..layout.topology import Layout, LayoutError, parse_bundle_shape
from ..pipeline.schedules import SCHEDULES
from ..training.data import DataError
from .launcher import LAYOUT_FILE_ENV

if TYPE_CHECKING:
    from ..training.trainer import TrainConfig

__all__ = ["Built", "Common", "common_options", "resolve_widths", "run_model"]

STOPPED_EXIT = 143  # 128 + SIGTERM: stopped on request, after a checkpoint


@dataclass
class Built:
    """What a model subcommand hands to :func:`run_model` (built alike on every rank)."""

    model: Any  # StagedModel
    train_set: Any
    eval_sets: dict[str, Any]  # name -> data set, evaluated after training ("eval", "val", "test")
    evaluate: Callable[[Any, Any], dict[str, float]]  # collective: (trainer, data set) -> metrics
    optimizer_fn: Callable[..., Any]
    describe: str = ""  # logged once by rank 0, e.g. the named config and its parameter count
    finish: Optional[Callable[[Any, str], None]] = None  # collective, after evaluation: (trainer, out)
    slices: Optional[tuple[int, ...]] = None  # token slices of every sequence (TeraPipe); None: whole


@dataclass
class Common:
    """The options every model subcommand shares."""

    stages: Optional[int]
    bundle_shape: Optional[str]
    stages_per_rank: int
    placement: str
    microbatches: int
    schedule: str
    fp16: bool
    accumulate: int
    steps: int
    batch_size: int
    lr: float
    seed: int
    out: Optional[str]
    device: str
    partition: str
    threads: int
    save_params: bool
    progress: bool
    checkpoint_every: int
    keep: int
    resume: bool
    timeout: float
    clip_grad: float
    warmup: int
    lr_schedule: str
    precision: str = "fp32"
    epochs: Optional[int] = None
    trace: Optional[str] = None

    def train_config(self, name: str) -> TrainConfig:
        """The trainer's knobs from these options, for model ``name`` (``out`` is set later).

        The one place a :class:`~hvdhybrid.training.trainer.TrainConfig` is made from CLI options.
        """
        from ..training.trainer import TrainConfig

        return TrainConfig(steps=self.steps, batch_size=self.batch_size, microbatches=self.microbatches,
                           accumulate=self.accumulate, schedule=self.schedule, fp16=self.fp16,
                           seed=self.seed, progress=self.progress, model_name=name,
                           checkpoint_every=self.checkpoint_every, keep=self.keep,
                           timeout=self.timeout, clip_grad=self.clip_grad, warmup=self.warmup,
                           lr_schedule=self.lr_schedule, precision=self.precision)


def common_options(default_steps: int, default_batch: int, default_lr: float,
                   default_microbatches: int = 4, default_clip: float = 0.0) -> Callable[..., Any]:
    """Decorator: add the common options and hand them to the command as one :class:`Common`."""
    opts = [
        click.option("--stages", type=int, default=None,
                     help="Pipeline stages per bundle, one rank each (default: the model's)."),
        click.option("--bundle-shape", default=None, metavar="W0,W1,..",
                     help="Ranks per stage, e.g. 2,1: 2 front ranks, 1 rear rank."),
        click.option("--stages-per-rank", type=int, default=1, show_default=True,
                     help="Model stages per stage group: cut the model finer than the ranks "
                          "(with --placement)."),
        click.option("--placement", default="looped", show_default=True, metavar="looped|contiguous|P0,P1,..",
                     help="Which stage group runs each model stage when --stages-per-rank > 1."),
        click.option("--microbatches", "-m", type=int, default=default_microbatches, show_default=True,
                     help="Microbatches per pass through the pipeline."),
        click.option("--schedule", type=click.Choice(sorted(SCHEDULES)), default="1f1b",
                     show_default=True),
        click.option("--fp16-compression/--no-fp16-compression", "fp16", default=True,
                     show_default=True, help="Send gradients across bundles as float16."),
        click.option("--accumulate", type=int, default=1, show_default=True,
                     help="Passes whose gradients add up to one optimizer step."),
        click.option("--steps", type=int, default=default_steps, show_default=True,
                     help="Optimizer steps (in all, counting those before a resume)."),
        click.option("--epochs", type=int, default=None,
                     help="Train this many passes over the training rows instead (sets --steps to "
                          "epochs x rows // batch size; each epoch is a new shuffle)."),
        click.option("--batch-size", type=int, default=default_batch, show_default=True,
                     help="Global batch of one optimizer step (all bundles, all passes)."),
        click.option("--lr", type=float, default=default_lr, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--out", type=click.Path(file_okay=False), default=None,
                     help="Output directory (default: runs/<model>-<time>)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True),
        click.option("--partition", type=click.Choice(["uniform", "params", "time"]),
                     default="params", show_default=True, help="How layers are cut into stages."),
        click.option("--threads", type=int, default=0,
                     help="Torch threads per rank (default: cores / ranks on this host)."),
        click.option("--save-params", is_flag=True,
                     help="Write the final parameters to OUT/params.pt (by full-model name)."),
        click.option("--progress/--no-progress", default=True, show_default=True,
                     help="Progress bar on rank 0 (else a log line per step)."),
        click.option("--checkpoint-every", type=int, default=0, show_default=True,
                     help="Steps between checkpoints (0: only at the end)."),
        click.option("--keep", type=int, default=3, show_default=True,
                     help="Complete checkpoints kept."),
        click.option("--resume", is_flag=True,
                     help="Continue the run in --out from its newest complete checkpoint."),
        click.option("--timeout", type=float, default=300.0, show_default=True,
                     help="Seconds a rank may wait for a peer before the job is stopped."),
        click.option("--clip-grad", type=float, default=default_clip, show_default=True,
                     help="Clip the whole model's gradient to this L2 norm (0: off)."),
        click.option("--warmup", type=int, default=0, show_default=True,
                     help="Steps of linear learning-rate warmup from 0 to --lr."),
        click.option("--lr-schedule", type=click.Choice(["constant", "linear", "cosine"]),
                     default="constant", show_default=True,
                     help="After the warmup: keep --lr, or decay it to 0 at the last step."),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
                     show_default=True,
                     help="bf16: autocast; fp16: autocast with dynamic loss scaling (for GPUs)."),
        click.option("--trace", type=click.Path(), default=None, metavar="FILE",
                     help="Write a Chrome trace of every rank's actions (Perfetto, chrome://tracing)."),
    ]

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(**kw: Any) -> Any:
            names = Common.__dataclass_fields__
            common = Common(**{k: kw.pop(k) for k in list(kw) if k in names})
            return fn(common, **kw)
        for o in reversed(opts):
            wrapper = o(wrapper)
        return wrapper
    return deco


OPTIMIZERS = ("adamw", "sgd")

optimizer_option = click.option(
    "--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True,
    help="adamw: weight decay 0.01; sgd: momentum 0.9 (matches across layouts to 1e-5).")
"""The ``--optimizer`` option of the models that offer AdamW or SGD (read with :func:`optimizer_fn`)."""


def optimizer_fn(name: str, lr: float) -> Callable[..., Any]:
    """``params -> optimizer`` for ``--optimizer NAME`` at ``--lr``: AdamW (weight decay 0.01) or
    SGD (momentum 0.9)."""
    import torch

    def make(params: Any) -> Any:
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return make


def resolve_widths(c: Common, world_size: int, default: tuple[int, ...]) -> tuple[int, ...]:
    if c.stages is not None and c.bundle_shape is not None:
        raise LayoutError("give either --stages or --bundle-shape, not both")
    if c.bundle_shape is not None:
        return parse_bundle_shape(c.bundle_shape)
    if c.stages is not None:
        return Layout.pipeline(world_size, c.stages).widths
    return default


def parse_placement(text: str, num_stages: int, num_groups: int) -> Placement:
    """``--placement`` for ``num_stages`` model stages on ``num_groups`` stage groups, or a one-line error."""
    try:
        return Placement.parse(text, num_stages, num_groups)
    except PlacementError as e:
        raise PlacementError(
            f"--placement: {e} (positions: the stage groups of --stages/--bundle-shape)") from None


def steps_for_epochs(epochs: int, rows: int, batch_size: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``rows`` (the sampler drops a partial last batch)."""
    if epochs < 1:
        raise DataError(f"--epochs must be >= 1, got {epochs}")
    if batch_size > rows:
        raise DataError(f"--batch-size {batch_size} is larger than the {rows} training rows; "
                        f"use --batch-size {rows} or less")
    return epochs * (rows // batch_size)


def _check_out(out: str, resume: bool) -> None:
    """Never write into another run's directory; on resume, insist there is a run to resume."""
    holds_run = any(os.path.exists(os.path.join(out, f)) for f in ("metrics.jsonl", "checkpoints"))
    if resume and not holds_run:
        raise DataError(f"--resume: {out} holds no run to resume (no checkpoints/); "
                        "pass the --out of the run to continue")
    if not resume and holds_run:
        raise DataError(f"output directory {out} already holds a run; pass another --out, "
                        "or --resume to continue it")


def run_model(name: str, c: Common, widths: tuple[int, ...], build: Callable[[int], Any],
              tensor: int = 1) -> None:
    """Validate everything, agree across ranks, train, evaluate, write results.

    ``build(num_stages)`` returns a :class:`Built`; it runs on every rank with the same seed.
    """
    import torch

    from ..training.device import local_size, pick_device

    w = world()
    rank = w.Get_rank()
    # ---- setup phase: everything that can fail on user input, before any group is made
    out = c.out
    with agreed(w):
        layout = Layout(w.Get_size(), widths, tensor)
        cfg = c.train_config(name)
        cfg.validate(layout.num_bundles, layout.widths)
        if c.timeout <= 0:
            raise DataError(f"--timeout must be positive, got {c.timeout}")
        if c.trace and not os.path.isdir(os.path.dirname(os.path.abspath(c.trace))):
            raise DataError(f"--trace {c.trace}: its directory does not exist; create it or pass "
                            "another path")
        device = pick_device(c.device)
        threads = c.threads or max(1, (os.cpu_count() or 1) // local_size())
        torch.set_num_threads(threads)
        torch.manual_seed(c.seed)
        if out is None:
            if c.resume:
                raise DataError("--resume needs --out: the directory of the run to continue")
            out = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        _check_out(out, c.resume)
        if c.stages_per_rank < 1:
            raise LayoutError(f"--stages-per-rank must be >= 1, got {c.stages_per_rank}")
        n_model = layout.num_stages * c.stages_per_rank
        placement = parse_placement(c.placement, n_model, layout.num_stages) \
            if c.stages_per_rank > 1 else None
    with agreed(w):  # every rank describes the same model; failures here happen on all ranks alike
        built: Built = build(n_model)
        cfg.slices = built.slices
        if c.epochs is not None:
            cfg.steps = steps_for_epochs(c.epochs, len(built.train_set), c.batch_size)
            cfg.validate(layout.num_bundles, layout.widths)
    out = w.bcast(out, root=0)
    assert out is not None
    cfg.out = out
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        if os.environ.get(LAYOUT_FILE_ENV):
            _write_layout(os.environ[LAYOUT_FILE_ENV], layout)
    w.Barrier()
    _train(w, name, c, cfg, layout, placement, built, device, threads)


def _write_layout(path: str, layout: Layout) -> None:
    coords = [layout.coord(r) for r in range(layout.world_size)]
    with open(path, "w") as f:
        json.dump({str(x.rank): x.tag() for x in coords}, f)


def _train(w: Any, name: str, c: Common, cfg: TrainConfig, layout: Layout, placement: Optional[Placement],
           built: Built, device: Any, threads: int) -> None:
    import torch

    from ..comm import horovod_ops
    from ..comm.groups import ProcessGroups
    from ..comm.p2p import P2PTimeout
    from ..log import tag_logger
    from ..training.checkpoint import CheckpointError
    from ..training.stopping import Stopped
    from ..training.trainer import Diverged, Trainer

    rank, size = w.Get_rank(), w.Get_size()
    tag = layout.coord(rank).tag()  # from the layout: the groups may be what fails
    log = tag_logger(tag)
    out = cfg.out
    assert out is not None
    try:
        # collective, and it starts Horovod: a rank failing here must not leave its peers waiting
        groups = ProcessGroups.create(layout, w)
        model, train_set = built.model, built.train_set
        trainer = Trainer(groups, model, built.optimizer_fn, cfg, device, placement)
        if c.resume:
            with agreed(w):
                path = trainer.resume(os.path.join(out, "checkpoints"))
                if path is None:
                    raise CheckpointError(f"--resume: no complete checkpoint in {out}/checkpoints")
            if rank == 0:
                log.info(f"resumed from {path} at step {trainer.step}")
        if rank == 0:
            log.info(f"{name}: {layout.describe()}, schedule {cfg.schedule}, "
                     f"{cfg.microbatches} microbatches, batch {cfg.batch_size}, "
                     f"accumulate {cfg.accumulate}, precision {cfg.precision}, fp16 compression "
                     f"{'on' if cfg.fp16 else 'off'}, device {device}, {threads} thread(s)/rank")
            if placement is not None:
                log.info(f"{model.graph.num_stages} model stages placed {c.placement}: "
                         f"{placement.describe()}")
            if built.describe:
                log.info(built.describe)
            n_params = model.parameter_count()
            sets = ", ".join(f"{len(d)} {k}" for k, d in built.eval_sets.items())
            log.info(f"{n_params:,} parameters; {len(train_set)} training rows"
                     f"{', ' + sets if sets else ''} rows; output in {out}")
        trainer.write_json("config.json", {"model": name, **trainer.config_dict()})
        if c.trace:
            from ..pipeline import trace

            trace.enable(w)
        t0 = time.perf_counter()
        first = trainer.step
        try:
            losses = trainer.fit(train_set)
        except Diverged as e:
            if rank == 0:
                log.error(f"hvdtrain: error: {e}")
            groups.close()
            horovod_ops.shutdown(w)
            sys.exit(1)
        except Stopped as e:
            if rank == 0:
                log.info(f"{e}; continue with --resume --out {out}")
            groups.close()
            horovod_ops.shutdown(w)
            sys.exit(STOPPED_EXIT)
        elapsed = time.perf_counter() - t0
        if c.trace:
            n_events = trace.write(w, c.trace, tag)
            if rank == 0:
                log.info(f"trace of {n_events} events written to {c.trace} (open it in https://ui.perfetto.dev)")
        results = {f"{k}_{m}": v for k, d in built.eval_sets.items()
                   for m, v in built.evaluate(trainer, d).items()}
        done = cfg.steps - first
        summary = {"model": name, "steps": cfg.steps, "final_loss": losses[-1] if losses else None,
                   **results, "skipped_steps": trainer.skipped_steps, "train_seconds": elapsed,
                   "samples_per_s": done * cfg.batch_size / max(elapsed, 1e-9)}
        trainer.write_json("summary.json", summary)
        params = trainer.gather_parameters() if c.save_params else None
        if built.finish is not None:
            built.finish(trainer, out)
        if rank == 0:
            if params is not None:
                torch.save(params, os.path.join(out, "params.pt"))
            shown = ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in results.items())
            log.info(f"done: {done} steps in {elapsed:.1f}s "
                     f"({summary['samples_per_s']:.0f} samples/s), final loss "
                     f"{summary['final_loss']}; {shown}; results in {out}")
        groups.close()
    except (SystemExit, UserError):
        raise
    except P2PTimeout as e:  # the message already names who waited for whom
        sys.stderr.write(f"[{tag}] {e}\n")
        sys.stderr.flush()
        w.Abort(1)
        raise
    except BaseException:
        if size > 1:
            sys.stderr.write(f"[{tag}] failed:\n{traceback.format_exc()}")
            sys.stderr.flush()
            w.Abort(1)  # end every rank now instead of leaving peers waiting
        raise
    horovod_ops.shutdown(w)
