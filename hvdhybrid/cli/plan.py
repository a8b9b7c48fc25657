"""``hvdtrain plan``: the rank layout as a table (and, with a hostfile, each rank's host and the traffic)."""

from __future__ import annotations

from typing import Optional

import click

from ..config import Config
from ..errors import USER_ERRORS, UserError
from ..layout.hostfile import place_ranks, read_hostfile
from ..layout.placement import Placement
from ..layout.topology import Layout, LayoutError
from .options import config_options, map_by_option

__all__ = ["plan", "render_plan"]


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-np", "--np", "np_", type=int, required=True, help="Number of ranks.")
@config_options(only=("stages", "bundle_shape", "tensor", "stages_per_rank", "placement", "fp16_compression",
                      "schedule", "microbatches", "batch_w"), collective=False)
@click.option("--hostfile", type=click.Path(), default=None, help="Show which host runs each rank.")
@map_by_option
@click.option("--param-mb", type=float, default=None,
              help="With --hostfile: the model's parameters in MB (fp32), split evenly over the stages.")
@click.option("--activation-mb", type=float, default=0.0, show_default=True,
              help="With --hostfile: MB of activations crossing each stage boundary per global batch.")
@click.option("--slices", type=int, default=1, show_default=True,
              help="With --schedule or -m: token slices per sequence in the drawn timeline.")
@click.option("--trace", "trace_file", type=click.Path(), default=None,
              help="Draw the last step a run recorded with hvdtrain ... --trace FILE, rank by rank.")
@click.option("--json", "as_json", is_flag=True, help="With a model command: print the prediction as JSON.")
@click.option("--fit", is_flag=True, help="With a model command: the largest world of at most -np ranks "
              "that its layout options fit (bundles as many as fit), else the smallest change to them "
              "that fits (--tensor, --stages lowered), instead of its memory.")
@click.option("--keep-layout", is_flag=True,
              help="With --fit: refuse instead of changing the layout options.")
@click.option("--auto", is_flag=True, help="With a model command: weigh every layout of -np ranks "
              "(tensor, stages, stages per rank, schedule, microbatches, --zero, --recompute) on costs "
              "measured here and print the fastest that fit --max-memory.")
@click.option("--max-memory", default=None, metavar="BYTES",
              help="With --auto: the most memory a rank may use (e.g. 2GB, 1500MB).")
@click.option("--top", type=int, default=5, show_default=True, help="With --auto: layouts to print.")
@click.option("--check", "check_run", type=click.Path(), default=None, metavar="RUN",
              help="A run made with --layout auto: its plan.json against what it measured (with --trace "
                   "FILE, per action kind).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def plan(cfg: Config, np_: int, hostfile: Optional[str], map_by: str, param_mb: Optional[float],
         activation_mb: float, slices: int, trace_file: Optional[str], as_json: bool, fit: bool,
         keep_layout: bool, auto: bool, max_memory: Optional[str], top: int, check_run: Optional[str],
         command: tuple[str, ...]) -> None:
    """Print the rank layout as a table, without training.

    With --hostfile, each rank's host (as mpirun --map-by places it) and, given
    --param-mb (and --activation-mb), the bytes per step on every link between
    hosts: what crosses the network and what stays in a host.

    With a model command after the options (hvdtrain plan -np 4 gpt2 --size
    gpt2-medium --tensor 2 --zero 2 --recompute full), each rank's memory as the
    run will count it: parameters, gradients, optimizer state, saved
    activations. The command's own options set the layout, the schedule,
    --zero and --recompute.

    With --schedule or -m, the timeline the schedule simulator computes for a
    chain of (stage groups x --stages-per-rank) stages, one row per stage group
    (unit costs), its bubble and each group's peak of activations held
    (hvdtrain plan -np 2 --stages 2 --stages-per-rank 2 --schedule zbv -m 4).
    With --trace FILE, the last step a run really ran, rank by rank.
    """
    if check_run is not None:
        import json

        from ..planner.check import check, render_check

        try:
            got = check(check_run, trace_file)
        except USER_ERRORS as e:
            raise UserError(str(e)) from None
        click.echo(json.dumps(got, indent=1) if as_json else render_check(got))
        return
    if trace_file is not None:
        from ..pipeline.timeline import draw_trace

        try:
            click.echo(draw_trace(trace_file))
        except ValueError as e:
            raise UserError(str(e)) from None
        return
    if auto or max_memory is not None:
        if not command:
            raise UserError("--auto plans a model command: hvdtrain plan -np 4 --auto mlp --batch-size 64")
        if max_memory is not None and not auto:
            raise UserError("--max-memory is a limit for --auto; add --auto")
        _plan_auto(np_, list(command), as_json, max_memory, hostfile, top)
        return
    if command:
        _plan_memory(np_, list(command), as_json, fit, keep_layout)
        return
    try:
        layout = cfg.parallel.layout(np_)
        pl = cfg.parallel.placement_for(layout, cfg.pipeline.schedule)
        hosts = place_ranks(read_hostfile(hostfile), np_, map_by) if hostfile else None
        if param_mb is not None and hosts is None:
            raise LayoutError("--param-mb shows traffic between hosts: give --hostfile too")
        if param_mb is not None and (param_mb < 0 or activation_mb < 0):
            raise LayoutError("--param-mb and --activation-mb must be >= 0")
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    ctx = click.get_current_context()
    drawn = _timeline(cfg, layout, pl, slices) if any(
        ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE
        for k in ("schedule", "microbatches", "slices", "batch_w")) else None
    click.echo(render_plan(layout, hosts, pl))
    if drawn is not None:
        click.echo(drawn)
    if hosts is not None and param_mb is not None:
        from ..layout.traffic import ModelSizes, cross_host_bytes, describe_links, link_bytes

        fp16 = cfg.comm.fp16_compression
        links = link_bytes(layout, hosts, ModelSizes.even(param_mb * 1e6, layout.num_stages,
                                                          activation_mb * 1e6, fp16))
        click.echo(f"traffic per step (--map-by {map_by}, gradients {'fp16' if fp16 else 'fp32'}):")
        for line in describe_links(links):
            click.echo(f"  {line}")
        click.echo(f"  across the network: {cross_host_bytes(links) / 1e6:.3g} MB/step")


def _timeline(cfg: Config, layout: Layout, placement: Optional[Placement], slices: int) -> str:
    """The simulated timeline of ``--schedule`` on a chain of the layout's model stages."""
    from ..parallel.graph import StageGraph
    from ..pipeline import schedules
    from ..pipeline.timeline import draw

    n = cfg.parallel.model_stages(layout)
    pl = placement or Placement.identity(n)
    m = cfg.pipeline.microbatches
    try:
        plan = schedules.build(cfg.pipeline.schedule, StageGraph.chain(n), m, pl, slices,
                               cfg.pipeline.weights_per_w())
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    sl = f", {slices} token slices" if slices > 1 else ""
    return (f"schedule {cfg.pipeline.schedule}, {m} microbatches{sl}, {n} stages on "
            f"{pl.num_positions} stage groups:\n" + draw(StageGraph.chain(n), pl, plan, m, slices))


def _plan_memory(np_: int, command: list[str], as_json: bool, fit: bool = False,
                 keep_layout: bool = False) -> None:
    import json

    from .layout_fit import describe_changes, fit_layout
    from .plan_memory import predict_memory, render_memory

    ctx = click.get_current_context()
    given = [f"--{k.replace('_', '-')}" for k in ("stages", "bundle_shape", "tensor", "stages_per_rank",
                                                   "placement", "hostfile", "param_mb")
             if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
    try:
        if given:
            raise LayoutError(f"{', '.join(given)} given before the model command: put the layout options "
                              f"after it (hvdtrain plan -np {np_} {command[0]} --tensor 2 ...)")
        if fit:
            got = fit_layout(command, np_, ctx.find_root().command, keep_layout)
            click.echo(json.dumps(got) if as_json else f"{got['np']} ranks: {got['layout']}"
                       + (f" (changed: {describe_changes(got['changes'])})" if got["changes"] else ""))
            return
        pred = predict_memory(command, np_, ctx.find_root().command)
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    click.echo(json.dumps(pred, indent=1) if as_json else render_memory(pred))


def _plan_auto(np_: int, command: list[str], as_json: bool, max_memory: Optional[str],
               hostfile: Optional[str], top: int) -> None:
    import json

    from ..planner.render import render
    from .plan_auto import plan_auto

    try:
        got = plan_auto(command, np_, click.get_current_context().find_root().command, max_memory, hostfile,
                        say=lambda m: click.echo(f"[plan] {m}", err=True))
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    if as_json:
        click.echo(json.dumps({**got, "ranked": [{k: v for k, v in r.items() if k != "choice"}
                                                 for r in got["ranked"][:top]]}, indent=1))
    else:
        click.echo(render(got, top))


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
