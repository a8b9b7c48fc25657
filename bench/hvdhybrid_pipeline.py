"""hvdhybrid: the bench MLP on 2 ranks, 8 microbatches; run under mpirun -np 2.

    mpirun -np 2 python bench/hvdhybrid_pipeline.py [--model mlp|gpt2] [SCHEDULE[:V[:N]] ...]

``V`` stages per rank (default 1; 2 for interleaved, zbv and vhalf): 2 stages, or 4 virtual stages
placed looped (or in a V for zbv and vhalf). ``N``: ``--batch-w`` (microbatches per W; default 0, auto).
"""

from __future__ import annotations

import sys

import torch
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

from hvdhybrid.comm.groups import ProcessGroups, mpi_world
from hvdhybrid.config import TrainConfig
from hvdhybrid.layout.placement import Placement
from hvdhybrid.layout.topology import Layout
from hvdhybrid.parallel.graph import StageGraph
from hvdhybrid.parallel.staged import StagedModel
from hvdhybrid.pipeline.virtual import V_SCHEDULES
from hvdhybrid.training.data import TensorDataset
from hvdhybrid.training.trainer import Trainer

VIRTUAL = ("interleaved", *V_SCHEDULES)


def build(world, schedule: str, v: int, batch_w: int, which: str = "mlp"):  # type: ignore[no-untyped-def]
    """A trainer for one schedule, and its name."""
    layout = Layout(world.Get_size(), (1, 1))
    n = 2 * v
    parts = model_parts(which, n)
    model = StagedModel(StageGraph.chain(n), parts, model_loss(which))
    placement = None if v == 1 else (Placement.v(n, 2) if schedule in V_SCHEDULES else Placement.looped(n, 2))
    groups = ProcessGroups.create(layout, world)
    cfg = TrainConfig(batch_size=model_rows(which), microbatches=MICRO, schedule=schedule, progress=False,
                      batch_w=batch_w)
    trainer = Trainer(groups, model, lambda p: torch.optim.SGD(p, lr=1e-3), cfg, placement=placement)
    name = ("" if which == "mlp" else f"{which}-") + f"hvdhybrid-{schedule}" + (f"-v{v}" if v > 1 else "") \
        + (f"-w{batch_w}" if batch_w else "")
    return name, n, trainer, groups


def main(argv: list[str], rounds: int = 4) -> None:
    """Every schedule built once, then timed in turn, ``rounds`` times: this machine's speed drifts by
    tens of percent over seconds, and alternating spreads the drift over all of them."""
    one_thread()
    world = mpi_world()
    which, names = model_arg(argv)
    runs = []
    for item in names or ["1f1b"]:
        name, _, rest = item.partition(":")
        v, _, bw = rest.partition(":")
        runs.append(build(world, name, int(v) if v else (2 if name in VIRTUAL else 1), int(bw or 0), which))
    x, y = model_batch(which)
    data = TensorDataset(x, y)
    idx = list(range(model_rows(which)))
    times: dict[str, list[float]] = {name: [] for name, *_ in runs}
    for r in range(rounds):
        for name, _, trainer, _ in runs:
            times[name] += time_steps(lambda t=trainer: t.train_step(data, idx), 2 if r == 0 else 1, 3,
                                      world.Barrier)
    if world.Get_rank() == 0:
        for name, n, _, _ in runs:
            emit({"name": name, "batch": model_rows(which), "step_s": median(times[name]), "stages": n})
    for *_, groups in runs:
        groups.close()


if __name__ == "__main__":
    main(sys.argv[1:])
