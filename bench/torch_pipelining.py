"""Peer: every torch.distributed.pipelining schedule (gloo, CPU) on the bench MLP; run under torchrun.

    torchrun --nproc-per-node 2 bench/torch_pipelining.py [--model mlp|gpt2] [SCHEDULE ...]

Single-stage schedules (gpipe, 1f1b) run 2 stages (one per rank); the multi-stage ones run 4 virtual
stages, looped (stage i on rank i % 2) or, for zbv and dualpipev, in a V (rank 0 holds stages 0 and 3).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.pipelining as pp
from common import (
    MICRO,
    emit,
    median,
    model_arg,
    model_batch,
    model_loss,
    model_parts,
    model_rows,
    one_thread,
    time_steps,
)

#: name -> (class, stages per rank, V placement)
SCHEDULES = {
    "gpipe": ("ScheduleGPipe", 1, False), "1f1b": ("Schedule1F1B", 1, False),
    "interleaved1f1b": ("ScheduleInterleaved1F1B", 2, False), "loopedbfs": ("ScheduleLoopedBFS", 2, False),
    "interleavedzb": ("ScheduleInterleavedZeroBubble", 2, False), "zbv": ("ScheduleZBVZeroBubble", 2, True),
    "dualpipev": ("ScheduleDualPipeV", 2, True),
}


def run(model: str, name: str) -> None:
    cls, v, vshape = SCHEDULES[name]
    rank, size = dist.get_rank(), dist.get_world_size()
    n = size * v
    mine = [i for i in range(n) if (i if i < size else 2 * size - 1 - i) == rank] if vshape else \
        [i for i in range(n) if i % size == rank]
    every = model_parts(model, n)
    parts = [every[i] for i in mine]
    stages = [pp.PipelineStage(p, i, n, torch.device("cpu")) for p, i in zip(parts, mine)]
    kind = getattr(pp, cls)
    sched = kind(stages[0] if v == 1 else stages, MICRO, loss_fn=model_loss(model))
    opt = torch.optim.SGD([q for p in parts for q in p.parameters()], lr=1e-3)
    x, y = model_batch(model)
    first, last = 0 in mine, n - 1 in mine

    def step() -> None:
        opt.zero_grad()
        if first and last:
            sched.step(x, target=y)
        elif first:
            sched.step(x)
        elif last:
            sched.step(target=y)
        else:
            sched.step()
        opt.step()

    times = time_steps(step, 3, 10, dist.barrier) if model == "mlp" else time_steps(step, 2, 4, dist.barrier)
    if rank == 0:
        tag = "" if model == "mlp" else f"{model}-"
        emit({"name": f"{tag}torch-{name}", "batch": model_rows(model), "step_s": median(times), "stages": n})


def main() -> None:
    one_thread()
    dist.init_process_group("gloo")
    model, names = model_arg(sys.argv[1:])
    for name in names or list(SCHEDULES):
        try:
            run(model, name)
        except Exception as e:  # a schedule this torch cannot run on the CPU: say so, go on
            if dist.get_rank() == 0:
                tag = "" if model == "mlp" else f"{model}-"
                emit({"name": f"{tag}torch-{name}", "error": f"{type(e).__name__}: {str(e)[:200]}"})
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()
