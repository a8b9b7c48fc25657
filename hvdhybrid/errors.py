"""User-facing errors: one base class for 'your input is wrong', shown as one line with exit code 2.

Every module that checks user input (layouts, batches, data files, hostfiles,
checkpoints, schedules, ...) raises a subclass of :class:`InputError`, defined
next to the check. The CLI catches the base class alone, so a new kind of
input error needs no registration anywhere.
"""

from __future__ import annotations

from typing import Any

import click

__all__ = ["InputError", "USER_ERRORS", "UserError"]


class InputError(ValueError):
    """Bad user input; the message says what was wrong and how to fix it."""


USER_ERRORS: tuple[type[Exception], ...] = (InputError,)


class UserError(click.ClickException):
    """One line to the user, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"hvdtrain: error: {self.format_message()}", err=True)
