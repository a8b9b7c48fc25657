"""User-facing errors: one base class for 'your input is wrong', shown as one line with exit code 2.

Every module that checks user input (layouts, batches, data files, hostfiles,
checkpoints, schedules, ...) raises a subclass of :class:`InputError`, defined
next to the check. The CLI catches the base class alone, so a new kind of
input error needs no registration anywhere. Pure: the CLI (``hvdhybrid.cli``)
turns these into click's one-line errors.
"""

from __future__ import annotations

__all__ = ["InputError", "USER_ERRORS", "UserError"]


class InputError(ValueError):
    """Bad user input; the message says what was wrong and how to fix it."""


USER_ERRORS: tuple[type[Exception], ...] = (InputError,)


class UserError(Exception):
    """Bad input already agreed on: the one line the user reads (the CLI shows it, exit code 2).

    Not an :class:`InputError`: it is the outcome of the checks, never caught as their failure.
    """
