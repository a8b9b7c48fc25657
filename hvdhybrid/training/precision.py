"""Mixed precision: bf16 or fp16 autocast around every forward, and dynamic loss scaling for fp16.

- ``fp32``: nothing changes.
- ``bf16``: forwards (and the loss) run under ``torch.autocast(dtype=bfloat16)``
  on CPU or GPU; activations travel between stages as bfloat16. bfloat16 has
  float32's range, so no loss scaling is needed.
- ``fp16``: forwards run under float16 autocast, and the loss is multiplied by
  a dynamic scale before backward so that small gradients do not flush to
  zero. After the gradients are averaged they are divided by the scale, then
  the global norm decides (:meth:`hvdhybrid.training.gradsync.GradSync.guard`): a
  non-finite norm skips the step on every rank together and halves the scale;
  ``growth_interval`` finite steps in a row double it. The decision comes from
  one allreduce over the world, so every rank holds the same scale. Meant for
  GPUs; CPU autocast to float16 works too (slowly), which is how it is tested.

Parameters, optimizer state and the gradients the optimizer sees stay float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch

from ..config import PRECISIONS
from ..errors import InputError

__all__ = ["PRECISIONS", "LossScaler", "Precision", "PrecisionError"]



class PrecisionError(InputError):
    """An unknown precision."""


@dataclass
class LossScaler:
    """The dynamic loss scale of fp16 training (the same on every rank)."""

    scale: float = 2.0 ** 16
    growth_interval: int = 2000
    good_steps: int = 0  # finite steps since the last change

    def update(self, finite: bool) -> None:
        """After each step: halve on overflow, double after ``growth_interval`` finite steps."""
        if not finite:
            self.scale, self.good_steps = max(self.scale / 2.0, 1.0), 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale, self.good_steps = self.scale * 2.0, 0

    def state(self) -> dict[str, float]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state(self, s: dict[str, float]) -> None:
        self.scale, self.good_steps = float(s["scale"]), int(s["good_steps"])


class Precision:
    """How a run computes: ``fp32``, ``bf16`` or ``fp16`` (with a :class:`LossScaler`)."""

    def __init__(self, mode: str = "fp32", growth_interval: int = 2000) -> None:
        check(mode)
        self.mode = mode
        self.scaler: Optional[LossScaler] = LossScaler(growth_interval=growth_interval) \
            if mode == "fp16" else None

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.mode]

    def autocast(self, device: torch.device) -> Callable[[], ContextManager[Any]]:
        """A factory of the context every forward (and loss) runs in."""
        dtype = self.dtype
        if dtype is None:
            return contextlib.nullcontext
        return lambda: torch.autocast(device_type=device.type, dtype=dtype)

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0


def check(mode: str) -> None:
    if mode not in PRECISIONS:
        raise PrecisionError(f"--precision {mode!r} is unknown; choose one of {', '.join(PRECISIONS)}")
