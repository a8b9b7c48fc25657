"""``hvdtrain``: the click group, one subcommand per model and tool, and the entry point."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

import click

from ..errors import USER_ERRORS, UserError
from .bert import bert
from .gpt import gpt
from .gpt2 import gpt2, merge
from .grover import grover
from .launch import launch
from .mlp import mlp
from .plan import plan
from .resnet import resnet
from .run_job import run_job

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
    from ..log import tag_logger

    tag_logger("hvdtrain")  # until a run tags its lines with the rank's coordinates


for _command in (resnet, mlp, run_job, plan, launch, grover, bert, gpt, gpt2, merge):
    cli.add_command(_command)


def plan_memory(command: list[str], np_: int) -> dict[str, Any]:
    """Python API of ``hvdtrain plan -np N MODEL ...``: each rank's memory predicted for the model
    command ``command`` (e.g. ``["gpt2", "--tensor", "2", "--zero", "2"]``) on ``np_`` ranks."""
    from .plan_memory import predict_memory

    return predict_memory(command, np_, cli)


def plan_auto(command: list[str], np_: int, max_memory: Optional[str] = None,
              hostfile: Optional[str] = None) -> dict[str, Any]:
    """Python API of ``hvdtrain plan -np N --auto [--max-memory B] MODEL ...``: every layout of ``np_``
    ranks for the model command, ranked by predicted step time (``result["ranked"][0]["options"]``: the
    winner as command-line options; see :func:`hvdhybrid.planner.search.search`)."""
    from .plan_auto import plan_auto as _plan_auto

    return _plan_auto(command, np_, cli, max_memory, hostfile)


def fit_layout(command: list[str], slots: int, keep_layout: bool = False) -> dict[str, Any]:
    """Python API of ``hvdtrain plan -np SLOTS --fit [--keep-layout] MODEL ...``: the largest world of at
    most ``slots`` ranks that the model command's own layout options fit, else the smallest change to them
    that fits (``{"np", "bundles", "layout", "changes", ...}``; ``changes``: option -> new value, None
    for dropped; apply them with :func:`hvdhybrid.cli.layout_fit.apply_changes`)."""
    from .layout_fit import fit_layout as fit

    return fit(command, slots, cli, keep_layout)


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
