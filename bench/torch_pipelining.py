"""Peer: torch.distributed.pipelining Schedule1F1B (gloo, CPU), 2 stages; run under torchrun."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from common import BATCH, MICRO, batch, emit, median, mlp_layers, one_thread, time_steps
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B


def main() -> None:
    one_thread()
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    layers = mlp_layers()
    per = len(layers) // size
    part = nn.Sequential(*layers[rank * per:(rank + 1) * per])
    stage = PipelineStage(part, rank, size, torch.device("cpu"))
    sched = Schedule1F1B(stage, MICRO, loss_fn=nn.functional.mse_loss)
    opt = torch.optim.SGD(part.parameters(), lr=1e-3)
    x, y = batch()

    def step() -> None:
        opt.zero_grad()
        if rank == 0:
            sched.step(x)
        else:
            sched.step(target=y)
        opt.step()

    times = time_steps(step, 3, 10, dist.barrier)
    if rank == 0:
        emit({"name": "torch-pipelining-1f1b", "batch": BATCH, "step_s": median(times)})
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()
