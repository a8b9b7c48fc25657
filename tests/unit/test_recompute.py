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
