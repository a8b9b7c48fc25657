"""User-facing errors: the types that mean 'your input is wrong', shown as one line with exit code 2."""

from __future__ import annotations

from typing import Any

import click

from .checkpoint import CheckpointError
from .data import DataError
from .device import DeviceError
from .graph import GraphError
from .groups import LaunchError
from .hostfile import HostfileError
from .partition import PartitionError
from .schedule import ScheduleError
from .slicing import BatchError
from .topology import LayoutError

__all__ = ["USER_ERRORS", "UserError"]

USER_ERRORS = (LayoutError, BatchError, GraphError, PartitionError, DataError, DeviceError,
               LaunchError, ScheduleError, HostfileError, CheckpointError)


class UserError(click.ClickException):
    """One line to the user, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"hvdtrain: error: {self.format_message()}", err=True)
