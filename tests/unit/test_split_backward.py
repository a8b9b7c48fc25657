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
        backward_weight([job], params)
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
    assert CALLS["n"] == (2 if tie else 1)  # B ran the chain once; W started at the branch nodes
    if inputs_need_grad:
        assert torch.allclose(dx, dx2, atol=1e-6)
    else:  # the first stage: B ran down to the first layer, not through it
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


def _batched(model: nn.Module, xs: list[torch.Tensor], gs: list[torch.Tensor], batched: bool) -> list:
    """Gradients of several microbatches: whole backwards, or B each then one batched W."""
    for p in model.parameters():
        p.grad = None
    params = [p for p in model.parameters()]
    jobs, outs = [], []
    for x, g in zip(xs, gs):
        leaf = x.detach().clone().requires_grad_(True)
        out = model(leaf)
        if batched:
            jobs.append(backward_input([out], [g], [leaf], params))
        else:
            torch.autograd.backward([out], [g])
        outs.append(out)
    if batched:
        backward_weight(jobs, params)
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("tie", [False, True])
def test_a_batched_w_equals_the_microbatches_one_by_one(tie: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The linear layers' weights take one product over the microbatches' rows (counted), the layer
    norm and the tie (two branch nodes) their autograd backward over all of them at once."""
    from hvdhybrid.pipeline import weight_products

    torch.manual_seed(2)
    model = Chain(tie)
    xs = [torch.randn(n, 6) for n in (3, 4, 5)]  # microbatches of different sizes
    gs = [torch.randn(n, 6) for n in (3, 4, 5)]
    counted = {"n": 0}
    real = weight_products.gradients

    def counting(products, kept):  # type: ignore[no-untyped-def]
        counted["n"] += 1
        assert len(products) == 3
        return real(products, kept)

    monkeypatch.setattr("hvdhybrid.pipeline.split_backward.gradients", counting)
    want = _batched(model, xs, gs, batched=False)
    got = _batched(model, xs, gs, batched=True)
    for a, b in zip(want, got):
        assert torch.allclose(a, b, atol=1e-6)



def test_each_weight_accumulates_once_per_batched_w() -> None:
    """What --reduce overlap and --zero 2 count on: a parameter is told final once, at its one
    accumulation (the post-accumulate-grad hook), however many microbatches a W covers."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 6, bias=False))
    calls: dict[int, int] = {}
    for i, p in enumerate(model.parameters()):
        p.register_post_accumulate_grad_hook(lambda _p, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
    _batched(model, [torch.randn(4, 6) for _ in range(4)], [torch.randn(4, 6) for _ in range(4)], True)
    assert calls == {i: 1 for i in range(len(list(model.parameters())))}


def test_a_batched_w_under_recomputation() -> None:
    """--recompute full (torch's non-reentrant checkpoint): the saved inputs the product reads are
    the recomputed ones."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(4)
    inner = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))

    class Stage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):  # type: ignore[no-untyped-def]
            return checkpoint(self.inner, x, use_reentrant=False)

    stage = Stage()
    xs = [torch.randn(3, 6) for _ in range(3)]
    gs = [torch.randn(3, 6) for _ in range(3)]
    want = _batched(inner, xs, gs, batched=False)
    got = _batched(stage, xs, gs, batched=True)
    for a, b in zip(want, got):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_split_backward_frees_the_counted_activations_every_step() -> None:
    """B and W keep the graph (retain_graph) and free it with the outputs: a saved output held by the
    counting hook as itself made a cycle through its own grad_fn, and every zb1 step leaked its stage's
    activations (the count grew by them each step; the plan's prediction held for one step only)."""
    import gc

    from hvdhybrid.pipeline.saved import SavedBytes

    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    counted = SavedBytes()
    counted.exclude(m.parameters())
    for _ in range(3):
        x = torch.randn(4, 16, requires_grad=True)
        with counted.hooks():
            y = m(x)
        assert counted.live > 0
        job = backward_input([y], [torch.ones_like(y)], [x], list(m.parameters()))
        backward_weight([job], list(m.parameters()))
        del job, y, x
        gc.collect()
        assert counted.live == 0


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("batched", [1, 3])
def test_w_under_recomputation_recomputes_each_region_once(tie: bool, batched: int) -> None:
    """--recompute full with a split backward: B recomputes each checkpointed region once, and W (one
    backward per group of weights: here a, b and the norm) once more, not once per group; a tie inside
    the stage (its group's backward runs the chain) keeps a recomputation of its own. The gradients are
    those of one backward."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = Chain(tie)
    runs = {"n": 0}

    def region(x: torch.Tensor) -> torch.Tensor:
        runs["n"] += 1
        return model(x)

    xs = [torch.randn(4, 6, requires_grad=True) for _ in range(batched)]
    gs = [torch.randn(4, 6) for _ in range(batched)]
    params = list(model.parameters())
    jobs = []
    for x, g in zip(xs, gs):
        out = checkpoint(region, x, use_reentrant=False)
        jobs.append(backward_input([out], [g], [x], params))
    assert runs["n"] == 2 * batched  # the forward, and B's recomputation
    backward_weight(jobs, params)
    assert runs["n"] == (4 if tie else 3) * batched  # W: once (the tie's group: once more)
    got = [p.grad.clone() for p in params] + [x.grad.clone() for x in xs]
    for p in params:
        p.grad = None
    plain = [x.detach().clone().requires_grad_(True) for x in xs]
    for x, g in zip(plain, gs):
        torch.autograd.backward([model(x)], [g])
    want = [p.grad for p in params] + [x.grad for x in plain]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want))
