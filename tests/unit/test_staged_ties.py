"""StagedModel: per-stage builds tag ties, keep a layer's shard tag, and share a tie held on one rank."""

from __future__ import annotations

import torch
from torch import nn

from hvdhybrid.parallel.graph import StageGraph
from hvdhybrid.parallel.ownership import Replicated, Sharded, Tie, Tied, owner_of, tag
from hvdhybrid.parallel.staged import StagedModel


class End(nn.Module):
    def __init__(self, shard: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.b = nn.Parameter(torch.zeros(3))
        if shard:
            tag(self.w, Sharded(0, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def model(shard: bool) -> StagedModel:
    return StagedModel(StageGraph.chain(2), None, nn.functional.mse_loss, ["a.", "b."],
                       builder=lambda s: End(shard), ties=(Tie({0: "a.w", 1: "b.w"}),))


def test_a_tie_keeps_the_shard_tag_its_layer_set() -> None:
    """Regression: build() re-tagged a vocab-parallel tied weight as unsharded (review of stop 8)."""
    owner = owner_of(model(True).build(1).w)
    assert owner == Tied("a.w", (0, 1), Sharded(0, 2, 1))
    plain = model(False).build(0)
    assert owner_of(plain.w) == Tied("a.w", (0, 1), None) and owner_of(plain.b) == Replicated()


def test_stages_on_one_rank_share_one_tied_parameter() -> None:
    m = model(False)
    mods = {0: m.build(0), 1: m.build(1)}
    m.share_local_ties(mods)
    assert mods[0].w is mods[1].w
    assert m.parameter_count() == 4 * 3 + 3 + 3  # the tie counted once
