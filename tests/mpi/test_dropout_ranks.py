"""Dropout that does not depend on the layout: any layout with dropout on matches one process."""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
from models import data, plain_loop
from mpi4py import MPI
from torch import nn

from hvdhybrid.comm.groups import ProcessGroups
from hvdhybrid.config import TrainConfig
from hvdhybrid.layout.placement import Placement
from hvdhybrid.layout.topology import Layout
from hvdhybrid.parallel.dropout import KeyedDropout
from hvdhybrid.parallel.staged import keyed_layers, sequential_model
from hvdhybrid.training.trainer import Trainer

STEPS, BATCH, P = 3, 96, 0.2


def fns() -> list[Any]:
    def layer(i: int, fin: int, fout: int) -> Any:
        return lambda: nn.Sequential(nn.Linear(fin, fout), nn.Tanh(), KeyedDropout(P, f"drop{i}"))
    return [layer(0, 16, 32), layer(1, 32, 32), layer(2, 32, 24), lambda: nn.Linear(24, 5)]


def opt(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def reference(clip: float) -> dict[str, torch.Tensor]:
    """One process, the whole global batch, the rows and step set by hand."""
    m = nn.Sequential(*keyed_layers(fns(), 0))
    plain_loop(m, data(), opt(m.parameters()), nn.functional.cross_entropy, STEPS, BATCH, clip)
    return {n: p.detach().clone() for n, p in m.named_parameters()}


LAYOUTS: list[tuple[tuple[int, ...], int, Optional[str]]] = [
    ((1,), 1, None), ((1, 1), 2, None), ((2, 2), 2, None), ((1, 3), 2, None), ((1, 1), 4, "looped")]


@pytest.mark.parametrize("widths,stages,placement", LAYOUTS,
                         ids=[f"{'x'.join(map(str, w))}-{k}st" for w, k, _ in LAYOUTS])
@pytest.mark.parametrize("microbatches,accumulate,clip", [(1, 1, 0.0), (2, 2, 0.05)])
def test_dropout_on_matches_one_process(world: Any, widths: tuple[int, ...], stages: int,
                                        placement: Optional[str], microbatches: int, accumulate: int,
                                        clip: float) -> None:
    if world.Get_size() % sum(widths):
        pytest.skip(f"world {world.Get_size()} does not fit widths {widths}")
    ref = reference(clip)
    layout = Layout(world.Get_size(), widths)
    model = sequential_model(fns(), [1] * 4 if stages == 4 else ([2, 2] if stages == 2 else [4]),
                             nn.functional.cross_entropy, 0)
    groups = ProcessGroups.create(layout, world)
    try:
        cfg = TrainConfig(steps=STEPS, batch_size=BATCH, microbatches=microbatches, accumulate=accumulate,
                          fp16_compression=False, progress=False, clip_grad=clip, timeout=60)
        pl = Placement.parse(placement, stages, len(widths)) if placement else None
        trainer = Trainer(groups, model, opt, cfg, placement=pl)
        trainer.fit(data())
        mine = trainer.named_parameters()
    finally:
        groups.close()
    worst = max(float((mine[n] - ref[n]).abs().max()) for n in mine)
    worst = float(world.allreduce(worst, op=MPI.MAX))
    assert worst <= 1e-5, f"max |param - reference| = {worst:.3g}"


def test_dropout_really_drops(world: Any) -> None:
    """The test above would pass with dropout off: check it changes the result."""
    with_drop, without = reference(0.0), None
    global P
    saved, P = P, 0.0
    try:
        without = reference(0.0)
    finally:
        P = saved
    assert max(float((with_drop[n] - without[n]).abs().max()) for n in without) > 1e-3
