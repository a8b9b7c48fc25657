"""B then W (pipeline/split_backward.py) gives the gradients of one backward, and W does not run the
activation-gradient chain again."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hvdhybrid.pipeline.split_backward import backward_input, backward_weight

CALLS = {"n": 0}


class CountedTanh(torch.autograd.Function):
    """tanh whose backward counts its calls (it is on the chain between the layers, not a weight's)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        y = x.tanh()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        CALLS["n"] += 1
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class Chain(nn.Module):
    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.a, self.b, self.norm = nn.Linear(6, 6), nn.Linear(6, 6), nn.LayerNorm(6)
        self.tie = nn.Parameter(torch.randn(6, 6)) if tie else None

    def forward(self, x):  # type: ignore[no-untyped-def]
        if self.tie is None:
            return self.norm(self.b(CountedTanh.apply(self.a(x))))
        h = CountedTanh.apply(self.a(x @ self.tie))
        return self.norm(self.b(h)) @ self.tie.T  # the tie used twice, far apart


def _both(model: nn.Module, x: torch.Tensor, g: torch.Tensor, split: bool) -> tuple[list, torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    leaf = x.detach().clone().requires_grad_(x.requires_grad)
    out = model(leaf)
    params = list(model.parameters())
    if split:
        job = backward_input([out], [g], [leaf] if leaf.requires_grad else [], params)
        backward_weight(job, params)
    else:
        torch.autograd.backward([out], [g])
    return [p.grad.clone() for p in params], leaf.grad


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("inputs_need_grad", [True, False])
def test_split_equals_one_backward(inputs_need_grad: bool, tie: bool) -> None:
    """With a weight used at both ends of the stage (a tie), its W runs the chain between them again
    (the gradient reaching the first use is replaced by the kept one, so it counts once)."""
    torch.manual_seed(0)
    model = Chain(tie)
    x = torch.randn(4, 6, requires_grad=inputs_need_grad)
    g = torch.randn(4, 6)
    whole, dx = _both(model, x, g, split=False)
    CALLS["n"] = 0
    split, dx2 = _both(model, x, g, split=True)
    for a, b in zip(whole, split):
        assert torch.allclose(a, b, atol=1e-6)
    if inputs_need_grad:
        assert torch.allclose(dx, dx2, atol=1e-6)
        assert CALLS["n"] == (2 if tie else 1)  # B ran the chain once; W started at the branch nodes
    else:
        assert dx2 is None


def test_a_transformer_block_splits_exactly() -> None:
    torch.manual_seed(1)
    block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    x, g = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8)
    whole, dx = _both(block, x, g, split=False)
    split, dx2 = _both(block, x, g, split=True)
    assert torch.allclose(dx, dx2, atol=1e-6)
    for a, b in zip(whole, split):
        assert torch.allclose(a, b, atol=1e-6)
