"""TeraPipe on this machine: one sequence per step through 2 pipeline stages, with no slicing, uniform
slicings and the planned slicing, all timed in one run; the latency model's prediction beside each.

    mpirun -np 2 python bench/gpt_slices.py --config small --seq 2048

Rank 0 measures the latency model (one stage, timed here), plans, and then every slicing trains the
same model for a few steps. Also timed: the whole model in one process (1 thread), the peer with
no pipeline at all. Prints one ``BENCH {json}`` line per run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Optional

import torch
from common import emit

import hvdhybrid as hh
from hvdhybrid.models.gpt.latency import measure
from hvdhybrid.models.gpt.model import config, gpt_model, unit_names
from hvdhybrid.parallel.staged import partition_sizes
from hvdhybrid.pipeline.token_slices import plan_slices, step_time, uniform
from hvdhybrid.training.data import TensorDataset


def _data(seq: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (16, seq + 1), generator=g)
    return TensorDataset(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())


def _time_steps(trainer: Any, data: TensorDataset, steps: int, warmup: int) -> float:
    sampler = hh.Sampler(len(data), 1, seed=0)
    times = []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        trainer.train_step(data, sampler.next())
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(groups: Any, cfg: Any, seq: int, slices: Optional[tuple[int, ...]], steps: int, warmup: int) -> float:
    sizes = partition_sizes([torch.nn.Identity()] * len(unit_names(cfg.layers)), groups.pipeline_size,
                            "uniform")
    model = gpt_model(cfg, 0, sizes, groups.tensor)
    tc = hh.TrainConfig(steps=steps + warmup, batch_size=1, microbatches=1, progress=False, schedule="gpipe",
                        slices=slices, fp16_compression=False)
    trainer = hh.Trainer(groups, model, lambda p: torch.optim.AdamW(p, lr=1e-4), tc)
    return _time_steps(trainer, _data(seq), steps, warmup)


def one_process(cfg: Any, seq: int, steps: int, warmup: int) -> float:
    """The whole model, whole sequence, a plain loop in this process."""
    from mpi4py import MPI

    model = gpt_model(cfg, 0, [len(unit_names(cfg.layers))], MPI.COMM_SELF)
    m = model.build(0)
    o = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x, y = _data(seq).batch([0])
    times = []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        o.zero_grad()
        model.loss_fn(m(x), y).backward()
        o.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--uniform", default="2,4,8,16,32")
    a = ap.parse_args()
    torch.set_num_threads(1)
    groups = hh.init(stages=2)
    world = groups.world
    cfg = config(a.config)
    gran = max(1, a.seq // 64)
    plan: Any = None
    if world.Get_rank() == 0:
        t0 = time.perf_counter()
        latency, samples = measure(cfg, 2, 1, a.seq)
        plan = (latency, plan_slices(latency, a.seq, 2, granularity=gran), time.perf_counter() - t0)
    latency, planned, measure_s = world.bcast(plan, root=0)
    cases: list[tuple[str, Optional[tuple[int, ...]]]] = [("none", None)]
    cases += [(f"uniform-{n}", uniform(a.seq, n)) for n in map(int, a.uniform.split(","))]
    cases += [("planned", planned.lengths)]
    common = {"config": a.config, "seq": a.seq, "stages": 2, "batch": 1}
    for name, sl in cases:
        t = run(groups, cfg, a.seq, sl, a.steps, a.warmup)
        pred = step_time(latency, sl or (a.seq,), 2)
        if world.Get_rank() == 0:
            emit({"name": f"gpt-slices-{name}", **common, "slices": list(sl or (a.seq,)), "step_s": t,
                  "predicted_s": pred})
    world.Barrier()
    if world.Get_rank() == 0:
        emit({"name": "gpt-one-process", **common, "stages": 1, "step_s": one_process(cfg, a.seq, a.steps, 1),
              "latency_model": latency.to_dict(), "measure_s": measure_s})
    world.Barrier()
    groups.close()


if __name__ == "__main__":
    main()
