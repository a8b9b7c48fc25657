"""GROVER finetuning throughput (molecules/s) for one layout; bench/run.py compares them.

    mpirun -np 1 python bench/grover_throughput.py plain [threads]   # plain PyTorch, no runtime
    mpirun -np 1 python bench/grover_throughput.py one [microbatches]   # hvdhybrid, 1 rank
    mpirun -np 2 python bench/grover_throughput.py tp [microbatches]    # node/edge views on 2 ranks
    mpirun -np 2 python bench/grover_throughput.py dp [microbatches]    # 2 bundles (Horovod, fp16)

Every layout trains the same model (config ``small`` by default) on the same
global batch of CHEMBL2321810 molecules, featurised before timing starts.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from common import emit, median, time_steps

from hvdhybrid.models.grover.config import CONFIGS
from hvdhybrid.models.grover.data import FinetuneSet, finetune_loss
from hvdhybrid.models.grover.molfiles import chembl2321810
from hvdhybrid.models.grover.staged import FinetuneHeads, GroverNet, stage_model
from hvdhybrid.parallel import randomness

BATCH = int(os.environ.get("GROVER_BENCH_BATCH", "64"))
CONFIG = os.environ.get("GROVER_BENCH_CONFIG", "small")
WARMUP, STEPS = 2, 8


def data() -> FinetuneSet:
    t = chembl2321810()
    assert t.labels is not None
    ds = FinetuneSet(t.mols[:BATCH * (WARMUP + STEPS)], t.labels[:BATCH * (WARMUP + STEPS)])
    ds.batch(range(len(ds)))  # featurise everything now, not while timing
    return ds


def plain(threads: int) -> None:
    torch.set_num_threads(threads)
    ds, cfg = data(), CONFIGS[CONFIG]
    torch.manual_seed(0)
    net = GroverNet(cfg, FinetuneHeads(cfg, 1))
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    it = iter(range(WARMUP + STEPS))

    def step() -> None:
        i = next(it)
        randomness.set_step(0, i + 1)
        g, t = ds.batch(range(i * BATCH, (i + 1) * BATCH))
        opt.zero_grad()
        finetune_loss(net(g), t).backward()
        opt.step()
    times = time_steps(step, WARMUP, STEPS)
    emit({"name": f"grover-plain-{threads}t", "ranks": 1, "threads": threads, "batch": BATCH,
          "step_s": median(times), "mol_s": BATCH / median(times)})


def runtime(mode: str, microbatches: int) -> None:
    from hvdhybrid.comm.groups import ProcessGroups, mpi_world
    from hvdhybrid.config import TrainConfig
    from hvdhybrid.layout.topology import Layout
    from hvdhybrid.training.trainer import Trainer

    torch.set_num_threads(1)
    world = mpi_world()
    ds, cfg = data(), CONFIGS[CONFIG]
    torch.manual_seed(0)
    net = GroverNet(cfg, FinetuneHeads(cfg, 1))
    task_parallel = mode == "tp"
    model = stage_model(net, 1, task_parallel, finetune_loss)
    layout = Layout(world.Get_size(), (1, 1) if task_parallel else (1,))
    groups = ProcessGroups.create(layout, world)
    tc = TrainConfig(batch_size=BATCH, microbatches=microbatches, progress=False, fp16_compression=True)
    trainer = Trainer(groups, model, lambda p: torch.optim.Adam(p, 1e-4), tc)
    it = iter(range(WARMUP + STEPS))

    def step() -> None:
        i = next(it)
        trainer.train_step(ds, list(range(i * BATCH, (i + 1) * BATCH)))
    times = time_steps(step, WARMUP, STEPS, world.Barrier)
    worst = world.allreduce(median(times), op=__import__("mpi4py").MPI.MAX)
    if world.Get_rank() == 0:
        emit({"name": f"grover-hvdhybrid-{mode}-m{microbatches}", "ranks": world.Get_size(), "threads": 1,
              "microbatches": microbatches, "layout": layout.describe(), "batch": BATCH, "step_s": worst,
              "mol_s": BATCH / worst})
    groups.close()
    from hvdhybrid.comm import horovod_ops

    horovod_ops.shutdown(world)


if __name__ == "__main__":
    np.seterr(all="ignore")
    mode = sys.argv[1] if len(sys.argv) > 1 else "one"
    if mode == "plain":
        plain(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    else:
        runtime(mode, int(sys.argv[2]) if len(sys.argv) > 2 else 1)
