"""hvdhybrid: the MLP in 2 stages (one rank each), 8 microbatches; run under mpirun -np 2."""

from __future__ import annotations

import sys

import torch
from common import BATCH, MICRO, batch, emit, median, mlp_layers, one_thread, time_steps
from torch import nn

from hvdhybrid.comm.groups import ProcessGroups, mpi_world
from hvdhybrid.config import TrainConfig
from hvdhybrid.layout.topology import Layout
from hvdhybrid.parallel.staged import split_sequential
from hvdhybrid.training.data import TensorDataset
from hvdhybrid.training.trainer import Trainer


def main(schedule: str) -> None:
    one_thread()
    world = mpi_world()
    layout = Layout(world.Get_size(), (1, 1))
    model = split_sequential(mlp_layers(), [4, 4], nn.functional.mse_loss)
    groups = ProcessGroups.create(layout, world)
    cfg = TrainConfig(batch_size=BATCH, microbatches=MICRO, schedule=schedule, progress=False)
    trainer = Trainer(groups, model, lambda p: torch.optim.SGD(p, lr=1e-3), cfg)
    x, y = batch()
    data = TensorDataset(x, y)
    idx = list(range(BATCH))
    times = time_steps(lambda: trainer.train_step(data, idx), 3, 10, world.Barrier)
    if world.Get_rank() == 0:
        emit({"name": f"hvdhybrid-{schedule}", "batch": BATCH, "step_s": median(times)})
    groups.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "1f1b")
