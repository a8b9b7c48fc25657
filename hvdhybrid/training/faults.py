"""Fault injection for the failure tests (off unless HVDHYBRID_INJECT_FAILURE is set)."""

from __future__ import annotations

import os
import time

__all__ = ["inject_failure", "injected_schedule"]


def inject_failure(rank: int, step: int, where: str) -> None:
    """Failure tests only: ``HVDHYBRID_INJECT_FAILURE=RANK:STEP[:step|ckpt][:kill]``.

    At that rank and step, in the step itself or half-way through writing the
    checkpoint, raise an exception (or, with ``kill``, SIGKILL this process).
    """
    spec = os.environ.get("HVDHYBRID_INJECT_FAILURE", "").split(":")
    if len(spec) < 2 or spec[:2] != [str(rank), str(step)]:
        return
    if (spec[2] if len(spec) > 2 else "step") != where:
        return
    stamp = os.environ.get("HVDHYBRID_INJECT_STAMP")
    if stamp:  # when it happened, so a test can time how fast the other ranks stop
        with open(stamp, "w") as f:
            f.write(f"{time.time()}\n")
    if "kill" in spec[3:]:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure at step {step}, {where} (HVDHYBRID_INJECT_FAILURE)")


def injected_schedule(rank: int) -> str:
    """Failure tests only: ``HVDHYBRID_INJECT_SCHEDULE=RANK:NAME`` makes that rank run schedule NAME
    (a schedule that does not match its peers' hangs: what the hang report must name); else ""."""
    spec = os.environ.get("HVDHYBRID_INJECT_SCHEDULE", "").split(":")
    return spec[1] if len(spec) == 2 and spec[0] == str(rank) else ""
