"""``hvdtrain``: the click group with common options, one subcommand per model, and tools."""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import click

from .data import DataError
from .device import DeviceError
from .graph import GraphError
from .groups import LaunchError
from .hostfile import HostfileError, place_ranks, read_hostfile
from .partition import PartitionError
from .schedule import SCHEDULES, ScheduleError
from .slicing import BatchError
from .topology import Layout, LayoutError, parse_bundle_shape

__all__ = ["main", "cli"]

USER_ERRORS = (LayoutError, BatchError, GraphError, PartitionError, DataError, DeviceError,
               LaunchError, ScheduleError, HostfileError)


class UserError(click.ClickException):
    """One line to the user, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"hvdtrain: error: {self.format_message()}", err=True)


# --------------------------------------------------------------------------- world
def _world() -> Any:
    from .groups import check_launch, mpi_world

    world = mpi_world()
    check_launch(world)
    return world


def _agree(world: Any, error: Optional[str]) -> None:
    """Collective: if any rank failed its setup, every rank stops with exit code 2.

    Only the first failing rank prints, so the user reads one line, not one per rank.
    """
    errors = world.allgather(error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        first_rank, msg = failed[0]
        if world.Get_rank() == first_rank:
            some = 1 < world.Get_size() and len(failed) < world.Get_size()
            raise UserError(f"{msg} (on rank {first_rank})" if some else msg)
        raise SystemExit(2)


# ------------------------------------------------------------------- common options
@dataclass
class Common:
    stages: Optional[int]
    bundle_shape: Optional[str]
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


def common_options(default_steps: int, default_batch: int, default_lr: float) -> Callable[..., Any]:
    """The options every model subcommand shares, collected into a :class:`Common`."""
    opts = [
        click.option("--stages", type=int, default=None,
                     help="Pipeline stages per bundle, one rank each (default: the model's)."),
        click.option("--bundle-shape", default=None, metavar="W0,W1,..",
                     help="Ranks per stage, e.g. 2,1: 2 front ranks, 1 rear rank."),
        click.option("--microbatches", "-m", type=int, default=4, show_default=True,
                     help="Microbatches per pass through the pipeline."),
        click.option("--schedule", type=click.Choice(sorted(SCHEDULES)), default="1f1b",
                     show_default=True),
        click.option("--fp16-compression/--no-fp16-compression", "fp16", default=True,
                     show_default=True, help="Send gradients across bundles as float16."),
        click.option("--accumulate", type=int, default=1, show_default=True,
                     help="Passes whose gradients add up to one optimizer step."),
        click.option("--steps", type=int, default=default_steps, show_default=True,
                     help="Optimizer steps."),
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


def resolve_widths(c: Common, world_size: int, default: tuple[int, ...]) -> tuple[int, ...]:
    if c.stages is not None and c.bundle_shape is not None:
        raise LayoutError("give either --stages or --bundle-shape, not both")
    if c.bundle_shape is not None:
        return parse_bundle_shape(c.bundle_shape)
    if c.stages is not None:
        return Layout.pipeline(world_size, c.stages).widths
    return default


# --------------------------------------------------------------------------- run
def run_model(name: str, c: Common, widths: tuple[int, ...],
              build: Callable[[int], Any]) -> None:
    """Validate everything, agree across ranks, train, evaluate, write results.

    ``build(num_stages)`` returns ``(staged_model, train_set, eval_set, metric_fn,
    optimizer_fn, sample_input)``; it runs on every rank with the same seed.
    """
    import torch

    from . import hvd
    from .device import local_size, pick_device
    from .groups import ProcessGroups
    from .log import tag_logger
    from .trainer import TrainConfig, Trainer

    world = _world()
    rank, size = world.Get_rank(), world.Get_size()
    # ---- setup phase: everything that can fail on user input, before any group is made
    error: Optional[str] = None
    out = c.out
    try:
        layout = Layout(size, widths)
        cfg = TrainConfig(steps=c.steps, batch_size=c.batch_size, microbatches=c.microbatches,
                          accumulate=c.accumulate, schedule=c.schedule, fp16=c.fp16,
                          seed=c.seed, progress=c.progress)
        cfg.validate(layout.num_bundles, layout.widths)
        device = pick_device(c.device)
        threads = c.threads or max(1, (os.cpu_count() or 1) // local_size())
        torch.set_num_threads(threads)
        torch.manual_seed(c.seed)
        if out is None:
            out = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if os.path.exists(os.path.join(out, "metrics.jsonl")):
            raise DataError(f"output directory {out} already holds a run (metrics.jsonl); "
                            "pass another --out")
    except USER_ERRORS as e:
        error = str(e)
    _agree(world, error)
    try:  # every rank builds the same model; failures here happen on all ranks alike
        model, train_set, eval_set, metric_fn, optimizer_fn = build(layout.num_stages)
    except USER_ERRORS as e:
        error = str(e)
    _agree(world, error)
    out = world.bcast(out, root=0)
    assert out is not None
    cfg.out = out
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    world.Barrier()

    # ---- run phase: groups, training, evaluation
    groups = ProcessGroups.create(layout, world)
    log = tag_logger(groups.coord.tag())
    try:
        trainer = Trainer(groups, model, optimizer_fn, cfg, device)
        if rank == 0:
            log.info(f"{name}: {layout.describe()}, schedule {cfg.schedule}, "
                     f"{cfg.microbatches} microbatches, batch {cfg.batch_size}, "
                     f"accumulate {cfg.accumulate}, fp16 compression "
                     f"{'on' if cfg.fp16 else 'off'}, device {device}, {threads} thread(s)/rank")
            n_params = sum(p.numel() for s in model.stages for p in s.parameters())
            log.info(f"{n_params:,} parameters; {len(train_set)} training rows, "
                     f"{len(eval_set)} evaluation rows; output in {out}")
        trainer.write_json("config.json", {"model": name, **trainer.config_dict()})
        t0 = time.perf_counter()
        losses = trainer.fit(train_set)
        elapsed = time.perf_counter() - t0
        acc, n_eval = trainer.evaluate(eval_set, metric_fn, 256)
        summary = {"model": name, "steps": cfg.steps, "final_loss": losses[-1] if losses else None,
                   "eval_accuracy": acc, "eval_rows": n_eval, "train_seconds": elapsed,
                   "samples_per_s": cfg.steps * cfg.batch_size / max(elapsed, 1e-9)}
        trainer.write_json("summary.json", summary)
        params = trainer.gather_parameters() if c.save_params else None
        if rank == 0:
            if params is not None:
                torch.save(params, os.path.join(out, "params.pt"))
            log.info(f"done: {cfg.steps} steps in {elapsed:.1f}s "
                     f"({summary['samples_per_s']:.0f} samples/s), final loss "
                     f"{summary['final_loss']}, eval accuracy {acc:.4f} on {n_eval} rows; "
                     f"results in {out}")
        groups.close()
    except BaseException:
        if size > 1:
            sys.stderr.write(f"[{groups.coord.tag()}] failed:\n{traceback.format_exc()}")
            sys.stderr.flush()
            world.Abort(1)  # end every rank now instead of leaving peers waiting
        raise
    hvd.shutdown(world)


# --------------------------------------------------------------------------- the group
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """Hybrid-parallel training (pipeline x task x data) on MPI and Horovod.

    Launch with `mpirun -np N bin/hvdtrain MODEL ...` or
    `horovodrun -np N bin/hvdtrain MODEL ...`; `hvdtrain plan` shows a layout first.
    """


def _classify(out: Any, y: Any) -> tuple[float, int]:
    return float((out.argmax(-1) == y).sum()), int(y.shape[0])


def _sequential_build(c: Common, layers_fn: Callable[[], list[Any]], dataset: Any,
                      test_fraction: float = 0.2) -> Callable[[int], Any]:
    import torch

    from .staged import partition_sizes, split_sequential

    def build(num_stages: int) -> Any:
        train_set, eval_set = dataset.split(test_fraction, seed=0)
        torch.manual_seed(c.seed)
        layers = layers_fn()
        sample = train_set.batch(range(min(32, len(train_set))))[0]
        sizes = partition_sizes(layers, num_stages, c.partition, sample)
        sizes = _world().bcast(sizes, root=0)  # 'time' differs per rank; rank 0 decides
        model = split_sequential(layers, sizes, torch.nn.functional.cross_entropy)

        def opt(params: Any) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=c.lr, momentum=0.9)
        return model, train_set, eval_set, _classify, opt
    return build


@cli.command()
@common_options(default_steps=150, default_batch=64, default_lr=0.05)
@click.option("--data", type=click.Path(), default=None,
              help="Image folder (one subfolder per class); default: scikit-learn's digits.")
@click.option("--image-size", type=int, default=16, show_default=True)
@click.option("--width", type=int, default=16, show_default=True, help="Channels of the first block.")
@click.option("--dp-only", is_flag=True, help="Pure data parallelism: one stage per bundle.")
def resnet(c: Common, data: Optional[str], image_size: int, width: int, dp_only: bool) -> None:
    """ResNet split into front and rear parts per bundle (bundle-based hybrid parallelism).

    Default layout: 2 stages (front, rear) per bundle when the world size is
    even, else one; --dp-only: one stage per bundle, all bundles data-parallel.
    """
    from .data import digits, image_folder
    from .models.resnet import resnet_layers

    world = _world()
    error = None
    try:
        if dp_only and (c.stages or c.bundle_shape):
            raise LayoutError("--dp-only means one stage per bundle; drop --stages/--bundle-shape")
        default = (1,) if dp_only or world.Get_size() % 2 else (1, 1)
        widths = resolve_widths(c, world.Get_size(), default)
        if data:
            ds, classes = image_folder(data, image_size)
        else:
            ds, classes = digits(image_size), [str(i) for i in range(10)]
    except USER_ERRORS as e:
        error = str(e)
    _agree(world, error)
    channels = int(ds.x.shape[1])
    run_model("resnet", c, widths, _sequential_build(
        c, lambda: resnet_layers(channels, len(classes), width), ds))


@cli.command()
@common_options(default_steps=100, default_batch=64, default_lr=0.05)
@click.option("--hidden", type=int, default=128, show_default=True)
@click.option("--depth", type=int, default=4, show_default=True)
def mlp(c: Common, hidden: int, depth: int) -> None:
    """A multilayer perceptron on scikit-learn's 8x8 digits (fast; for trying layouts)."""
    from .data import digits
    from .models.mlp import mlp_layers

    world = _world()
    error = None
    try:
        widths = resolve_widths(c, world.Get_size(), (1,))
        if depth < 1:
            raise PartitionError(f"--depth must be >= 1, got {depth}")
        ds = digits(8)
    except USER_ERRORS as e:
        error = str(e)
    _agree(world, error)
    run_model("mlp", c, widths, _sequential_build(c, lambda: mlp_layers(64, hidden, depth, 10), ds))


@cli.command()
@click.option("-np", "--np", "np_", type=int, required=True, help="Number of ranks.")
@click.option("--stages", type=int, default=None)
@click.option("--bundle-shape", default=None, metavar="W0,W1,..")
@click.option("--hostfile", type=click.Path(), default=None, help="Show which host runs each rank.")
def plan(np_: int, stages: Optional[int], bundle_shape: Optional[str], hostfile: Optional[str]) -> None:
    """Print the rank layout as a table, without training."""
    try:
        if stages is not None and bundle_shape is not None:
            raise LayoutError("give either --stages or --bundle-shape, not both")
        widths = parse_bundle_shape(bundle_shape) if bundle_shape else (1,) * (stages or 1)
        layout = Layout(np_, widths)
        hosts = place_ranks(read_hostfile(hostfile), np_) if hostfile else None
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    click.echo(render_plan(layout, hosts))


def render_plan(layout: Layout, hosts: Optional[list[str]] = None) -> str:
    """The layout as a table: one row per rank, then the groups."""
    head = f"{'rank':>5} {'bundle':>6} {'stage':>5} {'replica':>7}" + ("  host" if hosts else "")
    lines = [f"{layout.describe()}", head]
    for r in range(layout.world_size):
        c = layout.coord(r)
        lines.append(f"{r:>5} {c.bundle:>6} {c.stage:>5} {c.replica:>7}"
                     + (f"  {hosts[r]}" if hosts else ""))
    lines.append("bundle groups: " + " ".join(str(layout.bundle_members(b))
                                              for b in range(layout.num_bundles)))
    lines.append("stage groups:  " + " ".join(str(layout.stage_members(b, s))
                                              for b in range(layout.num_bundles)
                                              for s in range(layout.num_stages)))
    lines.append("data groups:   " + " ".join(str(g) for g in layout.all_data_groups())
                 + "   (Horovod process sets)")
    return "\n".join(lines)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-np", "--np", "np_", type=int, required=True, help="Number of ranks.")
@click.option("--hostfile", type=click.Path(), default=None)
@click.option("--horovodrun", "use_horovodrun", is_flag=True, help="Launch with horovodrun, not mpirun.")
@click.option("--dry-run", is_flag=True, help="Print the command instead of running it.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def launch(np_: int, hostfile: Optional[str], use_horovodrun: bool, dry_run: bool,
           args: tuple[str, ...]) -> None:
    """Check the hostfile, then start `hvdtrain ARGS` on NP ranks with mpirun (or horovodrun).

    Example: hvdtrain launch -np 4 --hostfile hostfiles/localhost -- resnet --steps 20
    """
    try:
        if np_ < 1:
            raise LayoutError(f"-np must be >= 1, got {np_}")
        hosts = read_hostfile(hostfile) if hostfile else None
        if hosts:
            place_ranks(hosts, np_)
        if not args:
            raise LaunchError("nothing to launch; add the subcommand, e.g. -- resnet --steps 20")
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    cmd = launch_command(np_, hostfile, use_horovodrun, list(args))
    if dry_run:
        click.echo(shlex.join(cmd))
        return
    os.execvp(cmd[0], cmd)


def launch_command(np_: int, hostfile: Optional[str], use_horovodrun: bool,
                   args: list[str]) -> list[str]:
    """The mpirun/horovodrun command line for ``hvdtrain ARGS`` on ``np_`` ranks."""
    entry = [sys.executable, "-m", "hvdhybrid"]
    root = os.geteuid() == 0
    mpi_args = ["--oversubscribe"] + (["--allow-run-as-root"] if root else [])
    if use_horovodrun:
        hr = shutil.which("horovodrun") or "horovodrun"
        cmd = [hr, "-np", str(np_), "--mpi", "--mpi-args", " ".join(mpi_args)]
        cmd += ["-hostfile", hostfile] if hostfile else ["-H", f"localhost:{np_}"]
        return cmd + entry + args
    cmd = ["mpirun", "-np", str(np_)] + mpi_args + ["-x", "PATH", "-x", "PYTHONPATH"]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    return cmd + entry + args


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: user errors are one line and exit code 2."""
    try:
        cli.main(args=argv, prog_name="hvdtrain", standalone_mode=True)
    except USER_ERRORS as e:  # raised outside a command's own handling
        # horovodrun --gloo: every process sees an MPI world of 1; let only one speak
        if os.environ.get("HOROVOD_RANK", "0") == "0":
            click.echo(f"hvdtrain: error: {e}", err=True)
        sys.exit(2)
