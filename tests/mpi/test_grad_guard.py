"""A non-finite gradient (here: float16 compression overflowing) skips the step on every rank."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from models import chain, data

from hvdhybrid.comm.groups import ProcessGroups
from hvdhybrid.config import TrainConfig
from hvdhybrid.layout.topology import Layout
from hvdhybrid.training.trainer import Diverged, Trainer


def test_overflowing_gradient_skips_the_step_everywhere(world: Any) -> None:
    if world.Get_size() < 2:
        pytest.skip("needs 2 bundles for the float16 all-reduce")
    layout = Layout(world.Get_size(), (1,))
    ds = data()
    model = chain(1)
    model.loss_fn = lambda out, y: torch.nn.functional.cross_entropy(out, y) * 1e9  # beyond 65504
    groups = ProcessGroups.create(layout, world)
    try:
        cfg = TrainConfig(steps=2, batch_size=32, fp16_compression=True, progress=False, timeout=30)
        trainer = Trainer(groups, model, lambda p: torch.optim.SGD(p, lr=0.1), cfg)
        before = trainer.named_parameters()
        trainer.fit(ds)
        after = trainer.named_parameters()
    finally:
        groups.close()
    assert trainer.skipped_steps == 2 and trainer.step == 2
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step must not move"


def test_a_diverged_loss_stops_every_rank(world: Any) -> None:
    layout = Layout(world.Get_size(), (1,))
    ds = data()
    ds.x[0, 0] = float("nan")
    groups = ProcessGroups.create(layout, world)
    try:
        cfg = TrainConfig(steps=3, batch_size=len(ds) // 2 // world.Get_size() * world.Get_size() * 2,
                          fp16_compression=False, progress=False, timeout=30)
        trainer = Trainer(groups, chain(1), lambda p: torch.optim.SGD(p, lr=0.1), cfg)
        with pytest.raises(Diverged, match="the loss is nan at step"):
            trainer.fit(ds)
    finally:
        groups.close()
