"""``hvdtrain launch``: check the hostfile, then start ``hvdtrain ARGS`` under mpirun or horovodrun."""

from __future__ import annotations

import shlex
import sys
from typing import Optional

import click

from ..comm.groups import LaunchError
from ..errors import USER_ERRORS, UserError
from ..layout.hostfile import place_ranks, read_hostfile
from ..layout.topology import LayoutError
from .launcher import launch_command, supervise
from .options import map_by_option

__all__ = ["launch"]


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-np", "--np", "np_", type=int, required=True, help="Number of ranks.")
@click.option("--hostfile", type=click.Path(), default=None)
@click.option("--horovodrun", "use_horovodrun", is_flag=True, help="Launch with horovodrun, not mpirun.")
@click.option("--dry-run", is_flag=True, help="Print the command instead of running it.")
@map_by_option
@click.option("--elastic", is_flag=True, help="When a rank or host fails, relaunch on the hosts left (at "
              "most -np ranks, bundles as many as fit) from the newest checkpoint; grow back when hosts "
              "return. Needs the job's --out (and --checkpoint-every).")
@click.option("--host-discovery-script", "discovery", default=None, metavar="CMD",
              help="With --elastic: a command printing the usable hosts as 'host slots=N' lines (instead "
                   "of --hostfile, which is read again at each relaunch).")
@click.option("--max-restarts", type=int, default=3, show_default=True,
              help="With --elastic: relaunches after failures before giving up.")
@click.option("--cooldown", type=float, default=300.0, show_default=True,
              help="With --elastic: seconds a host whose ranks died is left out.")
@click.option("--discovery-interval", type=float, default=10.0, show_default=True,
              help="With --elastic: seconds between discovery checks while a job runs (to grow).")
@click.option("--keep-layout", is_flag=True, help="With --elastic: stop when the job's --stages/--tensor/"
              "--bundle-shape fit no world left, instead of relaunching with the smallest change that fits.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def launch(np_: int, hostfile: Optional[str], use_horovodrun: bool, dry_run: bool, map_by: str,
           elastic: bool, discovery: Optional[str], max_restarts: int, cooldown: float,
           discovery_interval: float, keep_layout: bool, args: tuple[str, ...]) -> None:
    """Check the hostfile, then start `hvdtrain ARGS` on NP ranks with mpirun (or horovodrun).

    Example: hvdtrain launch -np 4 --hostfile hostfiles/localhost -- resnet --steps 20

    With --elastic the job survives a lost host: hvdtrain launch -np 4 --elastic --hostfile
    hosts -- mlp --stages 2 --checkpoint-every 1 --out runs/a
    """
    try:
        if np_ < 1:
            raise LayoutError(f"-np must be >= 1, got {np_}")
        if not args:
            raise LaunchError("nothing to launch; add the subcommand, e.g. -- resnet --steps 20")
        if elastic:
            _check_elastic(hostfile, discovery, use_horovodrun, dry_run, max_restarts, cooldown,
                           discovery_interval)
            from .elastic import Elastic, ElasticOptions

            run = Elastic(ElasticOptions(np_, list(args), hostfile, discovery, map_by, max_restarts,
                                         cooldown, discovery_interval, keep_layout))
            run.usable()  # a hostfile or discovery command that fails, before anything starts
        else:
            ctx = click.get_current_context()
            extra = [f"--{k.replace('_', '-')}" for k in ("discovery", "max_restarts", "cooldown",
                                                          "discovery_interval", "keep_layout")
                     if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
            if extra:
                raise LaunchError(f"{', '.join(extra)} appl{'y' if len(extra) > 1 else 'ies'} with "
                                  "--elastic; add --elastic or drop them")
        hosts = read_hostfile(hostfile) if hostfile and not elastic else None
        if hosts:
            place_ranks(hosts, np_, map_by)
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    if elastic:
        try:
            sys.exit(run.run())
        except USER_ERRORS as e:
            raise UserError(str(e)) from None
    cmd = launch_command(np_, hostfile, use_horovodrun, list(args), map_by)
    if dry_run:
        click.echo(shlex.join(cmd))
        return
    sys.exit(supervise(cmd, np_).rc)


def _check_elastic(hostfile: Optional[str], discovery: Optional[str], use_horovodrun: bool, dry_run: bool,
                   max_restarts: int, cooldown: float, interval: float) -> None:
    if (hostfile is None) == (discovery is None):
        raise LaunchError("--elastic needs where the hosts come from: --hostfile FILE or "
                          "--host-discovery-script CMD (one of them)")
    if use_horovodrun or dry_run:
        raise LaunchError("--elastic runs mpirun itself; drop "
                          + ("--horovodrun" if use_horovodrun else "--dry-run"))
    if max_restarts < 0 or cooldown < 0 or interval <= 0:
        raise LaunchError("--max-restarts and --cooldown must be >= 0 and --discovery-interval > 0")
