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
    sys.exit(supervise(cmd, np_))
