"""The loss scaler's arithmetic and the precision switch."""

from __future__ import annotations

import pytest
import torch

from hvdhybrid.training.precision import LossScaler, Precision, PrecisionError


def test_scaler_halves_on_overflow_and_grows_after_the_interval() -> None:
    s = LossScaler(scale=1024.0, growth_interval=3)
    s.update(False)
    assert (s.scale, s.good_steps) == (512.0, 0)
    for _ in range(2):
        s.update(True)
    assert s.scale == 512.0
    s.update(True)
    assert (s.scale, s.good_steps) == (1024.0, 0)
    t = LossScaler()
    t.load_state(s.state())
    assert t.state() == s.state()


def test_scale_never_drops_below_one() -> None:
    s = LossScaler(scale=2.0)
    for _ in range(5):
        s.update(False)
    assert s.scale == 1.0


@pytest.mark.parametrize("mode,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_dtypes(mode: str, dtype: torch.dtype) -> None:
    p = Precision(mode)
    with p.autocast(torch.device("cpu"))():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == dtype
    assert (p.scaler is not None) == (mode == "fp16")


def test_fp32_changes_nothing() -> None:
    p = Precision("fp32")
    with p.autocast(torch.device("cpu"))():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
    assert p.loss_scale == 1.0


def test_unknown_precision_is_a_user_error() -> None:
    with pytest.raises(PrecisionError, match="choose one of fp32, bf16, fp16"):
        Precision("fp8")
