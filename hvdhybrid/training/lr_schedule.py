"""Learning-rate schedules: linear warmup, then constant, linear or cosine decay (pure arithmetic).

The rate of optimizer step ``t`` (1-based) is ``base_lr x factor(t)``; it is
a function of the step alone, so a resumed run (at any layout) continues the
same curve::

    warmup 3, 10 steps, linear:  t  1    2    3    4    5    6    7    8    9    10
                                  .33  .67  1.0  .86  .71  .57  .43  .29  .14  0.0
"""

from __future__ import annotations

import math

from ..errors import InputError

__all__ = ["LRScheduleError", "SCHEDULES", "factor", "check"]

SCHEDULES = ("constant", "linear", "cosine")


class LRScheduleError(InputError):
    """An unknown schedule or a warmup that does not fit the run."""


def check(kind: str, warmup: int, steps: int) -> None:
    """Raises LRScheduleError naming the fix."""
    if kind not in SCHEDULES:
        raise LRScheduleError(f"unknown --lr-schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup < 0:
        raise LRScheduleError(f"--warmup must be >= 0 steps, got {warmup}")
    if steps and warmup > steps:
        raise LRScheduleError(f"--warmup {warmup} is longer than the run's {steps} steps; "
                              f"use --warmup {steps} or less")


def factor(step: int, steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the base rate at optimizer step ``step`` (1-based) of ``steps``."""
    if warmup and step <= warmup:
        return step / warmup
    if kind == "constant" or steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (steps - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
