"""Peak resident memory per rank: a 4-stage pipeline of a large MLP vs one process holding it all.

Three runs of one training step (SGD with momentum) of an MLP of ``--depth``
layers ``--width`` wide (default 10 x 4096: 604 MB of fp32 parameters):

- ``one process``: the whole model in one process (1 stage);
- ``keyed build``: 4 stages on 4 ranks, each rank building only its stages
  (``staged.sequential_model``);
- ``build-then-drop``: 4 stages on 4 ranks, every rank building the whole
  model and keeping its stage (what every rank did before per-stage builds).

Each rank reports its peak RSS (``ru_maxrss``); the driver prints the
largest per run and the ratio to one process. Never fails on a number.

    python bench/memory.py [--width 4096 --depth 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rank_main(width: int, depth: int, stages: int, drop: bool) -> None:
    import resource

    import torch
    from torch import nn

    from hvdhybrid.comm.groups import ProcessGroups, mpi_world
    from hvdhybrid.config import TrainConfig
    from hvdhybrid.layout.topology import Layout
    from hvdhybrid.models.mlp import mlp_layer_fns
    from hvdhybrid.parallel.staged import keyed_layers, sequential_model, split_sequential
    from hvdhybrid.training.data import TensorDataset
    from hvdhybrid.training.trainer import Trainer

    world = mpi_world()
    fns = mlp_layer_fns(64, width, depth, 10)
    q, r = divmod(depth, stages)
    sizes = [q + (1 if i < r else 0) for i in range(stages)]
    loss = nn.functional.cross_entropy
    model = split_sequential(keyed_layers(fns, 0), sizes, loss) if drop else \
        sequential_model(fns, sizes, loss, 0)
    groups = ProcessGroups.create(Layout(world.Get_size(), (1,) * stages), world, use_horovod=False)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g))
    cfg = TrainConfig(steps=1, batch_size=8, microbatches=2, fp16_compression=False, progress=False)
    trainer = Trainer(groups, model, lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9), cfg)
    if drop:
        model.stages = None  # drop what this rank does not run
        del model
        import gc

        gc.collect()
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    trainer.fit(ds)
    held = sum(p.numel() for p in trainer.sync.params) * 4 / 2 ** 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    rows = world.gather((world.Get_rank(), round(peak), round(held), round(built)), root=0)
    groups.close()
    if world.Get_rank() == 0:
        print("MEM " + json.dumps(rows), flush=True)


def launch(np_: int, width: int, depth: int, stages: int, drop: bool) -> list[tuple[int, int, int, int]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
           sys.executable, "-m", "mpi4py", __file__, "--rank", "--width", str(width), "--depth", str(depth),
           "--stages", str(stages)] + (["--drop"] if drop else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    for line in out.stdout.splitlines():
        if line.startswith("MEM "):
            return [tuple(r) for r in json.loads(line[4:])]  # type: ignore[misc]
    raise RuntimeError(f"no result from {' '.join(cmd)}:\n{out.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--drop", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank:
        rank_main(a.width, a.depth, a.stages, a.drop)
        return
    params_mb = (64 * a.width + (a.depth - 2) * a.width * a.width + a.width * 10) * 4 / 2 ** 20
    print(f"MLP {a.depth} x {a.width}: {params_mb:.0f} MiB of fp32 parameters; one SGD step (momentum)")
    one = launch(1, a.width, a.depth, 1, False)
    base = max(r[1] for r in one)
    print(f"{'run':<34} {'peak RSS per rank (MiB)':<28} {'max':>6} {'x one':>6}   "
          f"{'after building (MiB)':<28} {'max':>6} {'x one':>6}")
    base_built = max(r[3] for r in one)
    keyed = launch(a.stages, a.width, a.depth, a.stages, False)
    dropped = launch(a.stages, a.width, a.depth, a.stages, True)
    for name, rows in (("one process, whole model", one), (f"{a.stages} stages, keyed build", keyed),
                       (f"{a.stages} stages, build-then-drop", dropped)):
        peaks, builts = [r[1] for r in sorted(rows)], [r[3] for r in sorted(rows)]
        print(f"{name:<34} {str(peaks):<28} {max(peaks):>6} {max(peaks) / base:>5.2f}x   "
              f"{str(builts):<28} {max(builts):>6} {max(builts) / base_built:>5.2f}x")
        print("BENCH " + json.dumps({"bench": "memory", "run": name, "peak_mib": peaks,
                                     "built_mib": builts, "params_mib": [r[2] for r in sorted(rows)]}))


if __name__ == "__main__":
    main()
