"""``hvdtrain``: the click group with common options, one subcommand per model, and tools."""

from __future__ import annotations

import os
import shlex
import sys
import time
from typing import Any, Callable, Optional

import click

from ..comm.agreement import agreed, world
from ..comm.groups import LaunchError
from ..errors import USER_ERRORS, UserError
from ..layout.hostfile import MAP_BY, place_ranks, read_hostfile
from ..layout.placement import Placement
from ..layout.topology import Layout, LayoutError, parse_bundle_shape
from ..parallel.partition import PartitionError
from .bert import bert
from .gpt import gpt
from .gpt2 import gpt2, merge
from .grover import grover
from .launcher import launch_command, supervise
from .session import Built, Common, common_options, parse_placement, resolve_widths, run_model

__all__ = ["main", "cli"]

class ShownError(click.ClickException):
    """One line to the user, exit code 2 (an agreed :class:`~hvdhybrid.errors.UserError`)."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"hvdtrain: error: {self.format_message()}", err=True)


class _Group(click.Group):
    """The top group: an agreed user error from any command is click's one-line error, exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise ShownError(str(e)) from None


# --------------------------------------------------------------------------- the group
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """Hybrid-parallel training (pipeline x task x data) on MPI and Horovod.

    Launch with `mpirun -np N bin/hvdtrain MODEL ...` or
    `horovodrun -np N bin/hvdtrain MODEL ...`; `hvdtrain plan` shows a layout first.
    """


def _classify(out: Any, y: Any) -> tuple[float, int]:
    return float((out.argmax(-1) == y).sum()), int(y.shape[0])


def _layer_sizes(c: Common, fns: list[Any], num_stages: int, train_set: Any) -> list[int]:
    """Layers per stage for ``--partition``; ``time`` is measured on rank 0 (on up to 32 training
    rows) and shared."""
    from ..parallel.staged import keyed_layers, meta_layers, partition_sizes

    if c.partition != "time":  # from shapes alone: layers on the meta device hold no memory
        return partition_sizes(meta_layers(fns), num_stages, c.partition)
    got: tuple[Any, Optional[str]] = (None, None)
    if world().Get_rank() == 0:
        try:
            sample = train_set.batch(range(min(32, len(train_set))))[0]
            got = (partition_sizes(keyed_layers(fns, c.seed), num_stages, "time", sample), None)
        except PartitionError as e:
            got = (None, str(e))
    sizes, error = world().bcast(got, root=0)  # every rank fails alike, or none does
    if error:
        raise PartitionError(error)
    return list(sizes)


def _accuracy_eval(metric: Callable[[Any, Any], tuple[float, int]]) -> Callable[[Any, Any], dict[str, float]]:
    def evaluate(trainer: Any, data: Any) -> dict[str, float]:
        value, rows = trainer.evaluate(data, metric, 256)
        return {"accuracy" if metric is _classify else "metric": value, "rows": rows}
    return evaluate


def _sequential_build(c: Common, fns_fn: Callable[[], list[Any]], dataset: Any,
                      test_fraction: float = 0.2) -> Callable[[int], Any]:
    """A chain of layer factories; each rank builds only its stages' layers (keyed by layer index)."""
    import torch

    from ..parallel.staged import sequential_model

    def build(num_stages: int) -> Any:
        train_set, eval_set = dataset.split(test_fraction, seed=0)
        fns = fns_fn()
        sizes = _layer_sizes(c, fns, num_stages, train_set)
        model = sequential_model(fns, sizes, torch.nn.functional.cross_entropy, c.seed)

        def opt(params: Any) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=c.lr, momentum=0.9)
        return Built(model, train_set, {"eval": eval_set}, _accuracy_eval(_classify), opt)
    return build


_map_by_option = click.option(
    "--map-by", type=click.Choice(MAP_BY), default="slot", show_default=True,
    help="Ranks onto hosts as mpirun --map-by does: slot keeps a bundle's stages on one host, node deals "
         "ranks round-robin over the hosts (hvdtrain plan --hostfile shows the traffic of each).")


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
    from ..models.resnet import resnet_layer_fns
    from ..training.data import digits, image_folder

    w = world()
    with agreed(w):
        if dp_only and (c.stages or c.bundle_shape):
            raise LayoutError("--dp-only means one stage per bundle; drop --stages/--bundle-shape")
        default = (1,) if dp_only or w.Get_size() % 2 else (1, 1)
        widths = resolve_widths(c, w.Get_size(), default)
        if data:
            ds, classes = image_folder(data, image_size)
        else:
            ds, classes = digits(image_size), [str(i) for i in range(10)]
    channels = int(ds.x.shape[1])
    run_model("resnet", c, widths, _sequential_build(
        c, lambda: resnet_layer_fns(channels, len(classes), width), ds))


@cli.command()
@common_options(default_steps=100, default_batch=64, default_lr=0.05)
@click.option("--hidden", type=int, default=128, show_default=True)
@click.option("--depth", type=int, default=4, show_default=True)
def mlp(c: Common, hidden: int, depth: int) -> None:
    """A multilayer perceptron on scikit-learn's 8x8 digits (fast; for trying layouts)."""
    from ..models.mlp import mlp_layer_fns
    from ..training.data import digits

    w = world()
    with agreed(w):
        widths = resolve_widths(c, w.Get_size(), (1,))
        if depth < 1:
            raise PartitionError(f"--depth must be >= 1, got {depth}")
        ds = digits(8)
    run_model("mlp", c, widths, _sequential_build(c, lambda: mlp_layer_fns(64, hidden, depth, 10), ds))


@cli.command(name="run")
@common_options(default_steps=100, default_batch=32, default_lr=1e-3)
@click.argument("target")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE",
              help="Passed to the build function as a keyword (a string); repeat for more.")
def run_job(c: Common, target: str, args: tuple[str, ...]) -> None:
    """Train the model of any build function: TARGET is pkg.module:build or path/to/file.py:build.

    The function is called on every rank as build(stages=K, **args) and returns
    an hvdhybrid.Job (model: a StagedModel or a list of layer factories;
    train_set; optional loss_fn, optimizer, eval_set, metric). Every common
    option applies. Example: hvdtrain run docs/examples/build_fn.py:build --stages 2
    """
    import torch

    from ..parallel.staged import StagedModel, sequential_model
    from ..training.job import call_build, layers_or_model, load_target, parse_args

    w = world()
    with agreed(w):
        widths = resolve_widths(c, w.Get_size(), (1,))
        fn, kwargs = load_target(target), parse_args(args)

    def build(num_stages: int) -> Built:
        job = call_build(fn, num_stages, kwargs)
        model = layers_or_model(job)
        if not isinstance(model, StagedModel):
            fns = list(model)
            sizes = _layer_sizes(c, fns, num_stages, job.train_set)
            model = sequential_model(fns, sizes, job.loss_fn or torch.nn.functional.cross_entropy, c.seed)

        def opt(params: Any) -> torch.optim.Optimizer:
            return job.optimizer(params) if job.optimizer else torch.optim.AdamW(params, lr=c.lr)
        sets = {"eval": job.eval_set} if job.eval_set is not None else {}
        return Built(model, job.train_set, sets, _accuracy_eval(job.metric or _classify), opt,
                     f"run {target}: {model.graph.num_stages} stage(s)")

    run_model(f"run:{target.rpartition(':')[2]}", c, widths, build)


@cli.command()
@click.option("-np", "--np", "np_", type=int, required=True, help="Number of ranks.")
@click.option("--stages", type=int, default=None)
@click.option("--bundle-shape", default=None, metavar="W0,W1,..")
@click.option("--tensor", type=int, default=1, show_default=True,
              help="Ranks that split each replica's tensors.")
@click.option("--stages-per-rank", type=int, default=1, show_default=True,
              help="Model stages per stage group.")
@click.option("--placement", default="looped", show_default=True, metavar="looped|contiguous|P0,P1,..")
@click.option("--hostfile", type=click.Path(), default=None, help="Show which host runs each rank.")
@_map_by_option
@click.option("--param-mb", type=float, default=None,
              help="With --hostfile: the model's parameters in MB (fp32), split evenly over the stages.")
@click.option("--activation-mb", type=float, default=0.0, show_default=True,
              help="With --hostfile: MB of activations crossing each stage boundary per global batch.")
@click.option("--fp16-compression/--no-fp16-compression", "fp16", default=True, show_default=True)
def plan(np_: int, stages: Optional[int], bundle_shape: Optional[str], tensor: int, stages_per_rank: int,
         placement: str, hostfile: Optional[str], map_by: str, param_mb: Optional[float],
         activation_mb: float, fp16: bool) -> None:
    """Print the rank layout as a table, without training.

    With --hostfile, each rank's host (as mpirun --map-by places it) and, given
    --param-mb (and --activation-mb), the bytes per step on every link between
    hosts: what crosses the network and what stays in a host.
    """
    try:
        if stages is not None and bundle_shape is not None:
            raise LayoutError("give either --stages or --bundle-shape, not both")
        widths = parse_bundle_shape(bundle_shape) if bundle_shape else (1,) * (stages or 1)
        layout = Layout(np_, widths, tensor)
        if stages_per_rank < 1:
            raise LayoutError(f"--stages-per-rank must be >= 1, got {stages_per_rank}")
        pl = parse_placement(placement, layout.num_stages * stages_per_rank, layout.num_stages) \
            if stages_per_rank > 1 else None
        hosts = place_ranks(read_hostfile(hostfile), np_, map_by) if hostfile else None
        if param_mb is not None and hosts is None:
            raise LayoutError("--param-mb shows traffic between hosts: give --hostfile too")
        if param_mb is not None and (param_mb < 0 or activation_mb < 0):
            raise LayoutError("--param-mb and --activation-mb must be >= 0")
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    click.echo(render_plan(layout, hosts, pl))
    if hosts is not None and param_mb is not None:
        from ..layout.traffic import ModelSizes, cross_host_bytes, describe_links, link_bytes

        links = link_bytes(layout, hosts, ModelSizes.even(param_mb * 1e6, layout.num_stages,
                                                          activation_mb * 1e6, fp16))
        click.echo(f"traffic per step (--map-by {map_by}, gradients {'fp16' if fp16 else 'fp32'}):")
        for line in describe_links(links):
            click.echo(f"  {line}")
        click.echo(f"  across the network: {cross_host_bytes(links) / 1e6:.3g} MB/step")


def render_plan(layout: Layout, hosts: Optional[list[str]] = None,
                placement: Optional[Placement] = None) -> str:
    """The layout as a table: one row per rank, then the groups (and the placement of stages)."""
    tp = layout.tensor > 1
    head = f"{'rank':>5} {'bundle':>6} {'stage':>5} {'replica':>7}" + (f" {'tensor':>6}" if tp else "") \
        + ("  host" if hosts else "")
    lines = [f"{layout.describe()}", head]
    for r in range(layout.world_size):
        c = layout.coord(r)
        lines.append(f"{r:>5} {c.bundle:>6} {c.stage:>5} {c.replica:>7}" + (f" {c.tensor:>6}" if tp else "")
                     + (f"  {hosts[r]}" if hosts else ""))
    lines.append("bundle groups: " + " ".join(str(layout.bundle_members(b))
                                              for b in range(layout.num_bundles)))
    lines.append("stage groups:  " + " ".join(str(layout.stage_members(b, s))
                                              for b in range(layout.num_bundles)
                                              for s in range(layout.num_stages)))
    if tp:
        lines.append("tensor groups: " + " ".join(
            str(layout.tensor_members(b, s, q)) for b in range(layout.num_bundles)
            for s in range(layout.num_stages) for q in range(layout.widths[s])))
    lines.append("data groups:   " + " ".join(str(g) for g in layout.all_data_groups())
                 + "   (Horovod process sets)")
    if placement is not None:
        lines.append(f"model stages:  {placement.num_stages}, {placement.describe()} "
                     "(stage group = position)")
    return "\n".join(lines)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-np", "--np", "np_", type=int, required=True, help="Number of ranks.")
@click.option("--hostfile", type=click.Path(), default=None)
@click.option("--horovodrun", "use_horovodrun", is_flag=True, help="Launch with horovodrun, not mpirun.")
@click.option("--dry-run", is_flag=True, help="Print the command instead of running it.")
@_map_by_option
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def launch(np_: int, hostfile: Optional[str], use_horovodrun: bool, dry_run: bool, map_by: str,
           args: tuple[str, ...]) -> None:
    """Check the hostfile, then start `hvdtrain ARGS` on NP ranks with mpirun (or horovodrun).

    Example: hvdtrain launch -np 4 --hostfile hostfiles/localhost -- resnet --steps 20
    """
    try:
        if np_ < 1:
            raise LayoutError(f"-np must be >= 1, got {np_}")
        hosts = read_hostfile(hostfile) if hostfile else None
        if hosts:
            place_ranks(hosts, np_, map_by)
        if not args:
            raise LaunchError("nothing to launch; add the subcommand, e.g. -- resnet --steps 20")
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    cmd = launch_command(np_, hostfile, use_horovodrun, list(args), map_by)
    if dry_run:
        click.echo(shlex.join(cmd))
        return
    sys.exit(supervise(cmd))


cli.add_command(grover)
cli.add_command(bert)
cli.add_command(gpt)
cli.add_command(gpt2)
cli.add_command(merge)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: user errors are one line and exit code 2."""
    try:
        cli.main(args=argv, prog_name="hvdtrain", standalone_mode=True)
    except USER_ERRORS as e:  # raised outside a command's own handling
        # horovodrun --gloo: every process sees an MPI world of 1; let only one speak.
        # The others linger a moment: horovodrun kills every worker as soon as one exits.
        if os.environ.get("HOROVOD_RANK", "0") == "0":
            click.echo(f"hvdtrain: error: {e}", err=True)
        else:
            time.sleep(3)
        sys.exit(2)
