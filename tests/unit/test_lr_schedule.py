"""Warmup and decay: the drawn curve, the ends, and the errors."""

from __future__ import annotations

import math

import pytest

from hvdhybrid.training.lr_schedule import LRScheduleError, check, factor


def test_linear_with_warmup_is_the_drawn_curve() -> None:
    got = [round(factor(t, 10, 3, "linear"), 2) for t in range(1, 11)]
    assert got == [0.33, 0.67, 1.0, 0.86, 0.71, 0.57, 0.43, 0.29, 0.14, 0.0]


def test_cosine_and_constant() -> None:
    assert factor(1, 10, 0, "constant") == factor(10, 10, 0, "constant") == 1.0
    assert factor(2, 10, 2, "cosine") == 1.0
    assert math.isclose(factor(6, 10, 2, "cosine"), 0.5)
    assert math.isclose(factor(10, 10, 2, "cosine"), 0.0, abs_tol=1e-12)
    assert factor(2, 4, 4, "linear") == 0.5  # still warming up


@pytest.mark.parametrize("kind,warmup,steps,msg", [("step", 0, 5, "unknown --lr-schedule"),
                                                   ("linear", -1, 5, "--warmup must be >= 0"),
                                                   ("linear", 9, 5, "use --warmup 5 or less")])
def test_bad_schedules_name_the_fix(kind: str, warmup: int, steps: int, msg: str) -> None:
    with pytest.raises(LRScheduleError, match=msg):
        check(kind, warmup, steps)
