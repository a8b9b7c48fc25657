"""Recomputation: --recompute parsed and checked; the recomputed forward draws the same keyed dropout
masks (and only because the rows are restored); saved activations counted, parameters left out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hvdhybrid.parallel import randomness
from hvdhybrid.parallel.dropout import KeyedDropout
from hvdhybrid.parallel.recompute import Recompute, RecomputeError, attention, recomputed, selective
from hvdhybrid.pipeline.saved import SavedBytes


def test_parse_and_check() -> None:
    assert Recompute.parse("none") == Recompute("none")
    assert Recompute.parse("full:1,0,1") == Recompute("full", (0, 1))
    r = Recompute.parse("selective:2")
    assert [r.mode_of(s) for s in range(4)] == ["none", "none", "selective", "none"]
    for text, expect in [("most", "the mode must be one of none, full, selective"),
                         ("full:a", "stages must be numbers"), ("none:1", "none takes no stages")]:
        with pytest.raises(RecomputeError, match=expect):
            Recompute.parse(text)
    with pytest.raises(RecomputeError, match=r"stage\(s\) \[4\] out of range; the model has stages 0..3"):
        Recompute.parse("full:4").check(4, True, "m")
    with pytest.raises(RecomputeError, match="and mlp has none"):
        Recompute.parse("selective").check(2, False, "mlp")
    with pytest.raises(RecomputeError, match="key/value cache twice"):
        Recompute.parse("full").check(2, True, "gpt", sliced=True)
    Recompute.parse("selective").check(2, True, "gpt", sliced=True)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.drop = KeyedDropout(0.5, "net.drop")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(torch.tanh(self.a(x))))


def grads(net: Net, run: callable) -> list[torch.Tensor]:  # type: ignore[valid-type]
    net.zero_grad()
    randomness.set_step(0, 1)
    randomness.set_rows(range(4))
    out = run(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    randomness.set_rows(range(100, 104))  # another microbatch's forward before this backward
    out.sum().backward()
    return [p.grad.clone() for p in net.parameters()]


def test_recomputed_dropout_masks_are_the_forwards_and_only_thanks_to_the_restored_rows() -> None:
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    net = Net().train()
    kept = grads(net, net)
    again = grads(net, lambda x: recomputed(net, x))
    assert all(torch.equal(a, b) for a, b in zip(kept, again))
    plain = grads(net, lambda x: checkpoint(net, x, use_reentrant=False))  # no rows restored
    assert not all(torch.equal(a, b) for a, b in zip(kept, plain))


def test_attention_recomputes_only_under_selective() -> None:
    counted = SavedBytes()
    x = torch.randn(64, 16, requires_grad=True)  # 64 x 64 attention weights, 4x the input

    def core(t: torch.Tensor) -> torch.Tensor:
        return torch.softmax(t @ t.t(), -1) @ t
    with counted.hooks():
        y = attention(core, x)
    kept = counted.peak
    del y
    counted = SavedBytes()
    with counted.hooks(), selective(True):
        y = attention(core, x)
    assert counted.peak == 64 * 16 * 4 and kept == counted.peak + 64 * 64 * 4  # only the input is kept
    y.sum().backward()


def test_saved_bytes_count_storages_once_and_leave_out_parameters() -> None:
    lin = nn.Linear(256, 256)
    counted = SavedBytes()
    counted.exclude(lin.parameters())
    x = torch.randn(32, 256, requires_grad=True)
    with counted.hooks():
        h = torch.relu(lin(x))
        out = (h * h).sum()
    assert counted.live == counted.peak
    assert 2 * 32 * 256 * 4 <= counted.live <= 4 * 32 * 256 * 4  # x and relu's output (saved twice: once)
    out.backward()
    del out, h
    assert counted.live == 0 and counted.peak > 0


def test_a_split_backward_recomputes_twice_with_the_same_masks() -> None:
    """zb1's B (input gradients, graph kept) then W (weight gradients): two recomputations."""
    torch.manual_seed(0)
    net = Net().train()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def run(fn: callable) -> list[torch.Tensor]:  # type: ignore[valid-type]
        net.zero_grad()
        x.grad = None
        randomness.set_step(0, 1)
        randomness.set_rows(range(4))
        out = fn(x)
        randomness.set_rows(range(100, 104))
        torch.autograd.backward([out.sum()], inputs=[x], retain_graph=True)
        torch.autograd.backward([out.sum()], inputs=list(net.parameters()))
        return [x.grad.clone()] + [p.grad.clone() for p in net.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(run(net), run(lambda t: recomputed(net, t))))


def test_selective_keeps_the_forwards_masks_counts_them_and_does_not_redraw() -> None:
    """The attention core's dropout mask is drawn once (in the forward), kept at 1 byte per element
    (counted as saved), and handed back to both recomputations of a split backward (B, then W)."""
    from hvdhybrid.parallel import dropout

    torch.manual_seed(0)
    x = torch.randn(4, 8, 8, requires_grad=True)
    w = nn.Parameter(torch.randn(8, 8))

    def core(t: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(t @ w @ t.transpose(1, 2), -1)
        return dropout.keyed_window_drop(probs, 0.3, "core", (8, 8), (slice(None),)) @ t

    draws = []
    real = dropout.randomness.generator

    def counting(*names: object) -> torch.Generator:
        draws.append(names)
        return real(*names)

    def run(on: bool) -> tuple[list[torch.Tensor], int]:
        x.grad, w.grad = None, None
        randomness.set_step(0, 1)
        randomness.set_rows(range(4))
        counted = SavedBytes()
        counted.exclude([w])
        with counted.hooks(), selective(on):
            out = attention(core, x)
        randomness.set_rows(range(100, 104))  # another microbatch's forward before this backward
        torch.autograd.backward([out.sum()], inputs=[x], retain_graph=True)
        torch.autograd.backward([out.sum()], inputs=[w])
        return [x.grad.clone(), w.grad.clone()], counted.peak

    dropout.randomness.generator = counting
    try:
        kept, kept_bytes = run(False)
        assert len(draws) == 4  # one generator per row
        draws.clear()
        again, sel_bytes = run(True)
        assert len(draws) == 4  # drawn in the forward only: the two recomputations reuse the tape
    finally:
        dropout.randomness.generator = real
    assert all(torch.equal(a, b) for a, b in zip(kept, again))
    mask = 4 * 8 * 8 // 8  # packed: 1 bit per element
    assert sel_bytes == x.numel() * 4 + mask  # the core's input and its mask, nothing else
    assert kept_bytes > sel_bytes + 2 * mask * 32  # softmax output and dropped probabilities at 4 bytes


def test_a_replay_that_draws_more_than_its_forward_is_an_error() -> None:
    from hvdhybrid.parallel.dropout import MaskTape

    tape = MaskTape()
    with tape.recording():
        tape.take(lambda: torch.ones(2, dtype=torch.bool))
    with tape.replaying():
        tape.take(lambda: torch.zeros(2, dtype=torch.bool))
        with pytest.raises(RuntimeError, match="drew more dropout masks"):
            tape.take(lambda: torch.zeros(2, dtype=torch.bool))


class _Mark(nn.Module):
    """Identity that logs its forwards and backwards: how many layers are recomputed and not yet
    back-propagated at once (a recomputed layer's activations are held until its backward)."""

    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log = self.log

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
                log.append(1)
                return t.view_as(t)

            @staticmethod
            def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
                log.append(-1)
                return g
        return Fn.apply(x)


def _most_pending(log: list) -> int:
    n = top = 0
    for e in log:
        n += e
        top = max(top, n)
    return top


def test_full_recomputes_a_chain_a_layer_at_a_time_keeping_each_layers_input() -> None:
    """``full`` over a :class:`Part`: the same gradients (dropout on) as no recomputation; it keeps each
    layer's input and dropout mask, packed (not the layers' activations), and its backward holds one
    layer's activations at a time, where recomputing the chain as one region holds them all."""
    from hvdhybrid.parallel import recompute
    from hvdhybrid.parallel.staged import Part

    torch.manual_seed(0)
    log: list = []
    layers = [nn.Sequential(nn.Linear(64, 256), _Mark(log), nn.Tanh(), KeyedDropout(0.3, f"l{i}"),
                            nn.Linear(256, 64)) for i in range(6)]
    part = Part(layers, 0).train()
    x0 = torch.randn(32, 64)

    def run(fn: callable) -> tuple[list[torch.Tensor], int, int]:  # type: ignore[valid-type]
        part.zero_grad()
        randomness.set_step(0, 1)
        randomness.set_rows(range(32))
        counted = SavedBytes()
        counted.exclude(part.parameters())
        x = x0.clone().requires_grad_()
        with counted.hooks():
            out = fn(x)
        log.clear()  # from here: the backward, and the recomputation within it
        out.sum().backward()
        return [p.grad.clone() for p in part.parameters()], counted.peak, _most_pending(log)

    want, kept_none, _ = run(part)
    got, kept_full, held = run(lambda x: recompute.full(part, x))
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert kept_full == 6 * 32 * 64 * 4 + 6 * 32 * 256 // 8  # each layer's input, and its mask (packed)
    assert kept_full < kept_none / 4
    _, kept_region, held_region = run(lambda x: recomputed(part, x))
    assert kept_region == 32 * 64 * 4
    assert (held, held_region) == (1, 6)  # one layer's activations at a time, not the chain's


def test_full_refuses_a_layer_that_changes_its_input_in_place() -> None:
    from hvdhybrid.parallel import recompute
    from hvdhybrid.parallel.staged import Part

    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mul_(2.0)

    part = Part([nn.Linear(4, 4), Scale(), nn.Linear(4, 4)], 0)
    with pytest.raises(recompute.RecomputeError, match="layer 1 of the stage changes its input in place"):
        recompute.full(part, torch.randn(2, 4, requires_grad=True))
    ok = Part([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)], 0)
    recompute.full(ok, torch.randn(2, 4, requires_grad=True)).sum().backward()


def test_zb1_batches_w_by_default_except_under_full_recomputation() -> None:
    from hvdhybrid.config import PipelineConfig

    assert PipelineConfig(schedule="zb1", microbatches=4).weights_per_w() == 4
    assert PipelineConfig(schedule="zb1", microbatches=4, recompute="full").weights_per_w() == 1
    assert PipelineConfig(schedule="zb1", microbatches=4, recompute="full", batch_w=2).weights_per_w() == 2
