"""Peers for `hvdtrain resnet --arch resnet50`: plain data parallelism the usual ways, on CPU processes.

Every mode trains the same ResNet-50 (torchvision's architecture as hvdhybrid builds it: GroupNorm,
10 classes, built from seed 0) with SGD (lr 0.01, momentum 0.9) and cross-entropy on scikit-learn's
digits upsampled to --image-size, as three channels, in the same fixed batches. One step is a global
batch of --batch images split evenly over the processes. Rank 0 prints one ``BENCH {json}`` line:
name, procs, batch, image_size, step_s (median seconds per step), images_s.
Run from the repository root with OMP_NUM_THREADS=1 (and, as root, OMPI_ALLOW_RUN_AS_ROOT=1
OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 for mpirun):

    torchrun --nproc-per-node N bench/resnet_peers.py ddp [options]        # DistributedDataParallel, gloo
    mpirun -np N --oversubscribe -x PYTHONPATH -x OMP_NUM_THREADS \\
        python bench/resnet_peers.py horovod [--no-fp16-compression] [options]
    python bench/resnet_peers.py single [options]

options: --batch 48 --image-size 32 --steps 6 --warmup 2
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

import torch
import torch.nn.functional as F
from common import emit, median, one_thread, time_steps
from torch import nn


def load_model() -> nn.Module:
    from hvdhybrid.models.resnet import torchvision_layer_fns
    from hvdhybrid.parallel.staged import Part

    torch.manual_seed(0)
    return Part([f() for f in torchvision_layer_fns("resnet50", 3, 10)], 0)


def batches(batch: int, image_size: int, rank: int, procs: int
            ) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the next global batch, on every call."""
    from hvdhybrid.training.data import digits

    if batch % procs:
        raise SystemExit(f"--batch {batch} does not split evenly over {procs} processes")
    ds = digits(image_size)
    x, y = ds.x.expand(-1, 3, -1, -1).contiguous(), ds.y
    per, n = batch // procs, x.shape[0] // batch
    box = {"i": 0}

    def nxt() -> tuple[torch.Tensor, torch.Tensor]:
        lo = (box["i"] % n) * batch + rank * per
        box["i"] += 1
        return x[lo:lo + per], y[lo:lo + per]
    return nxt


def train_step(model: nn.Module, opt: torch.optim.Optimizer,
               nxt: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    def step() -> None:
        x, y = nxt()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def run(a: argparse.Namespace) -> tuple[int, int, Callable[[], None], Callable[[], None]]:
    """(rank, procs, one training step, teardown) for mode ``a.mode``."""
    model = load_model()
    if a.mode == "single":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return 0, 1, train_step(model, opt, batches(a.batch, a.image_size, 0, 1)), lambda: None
    if a.mode == "ddp":
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo")
        rank, procs = dist.get_rank(), dist.get_world_size()
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        return rank, procs, train_step(ddp, opt, batches(a.batch, a.image_size, rank, procs)), \
            dist.destroy_process_group
    import horovod.torch as hvd

    hvd.init()
    rank, procs = hvd.rank(), hvd.size()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    comp = hvd.Compression.fp16 if a.fp16_compression else hvd.Compression.none
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=comp)
    return rank, procs, train_step(model, opt, batches(a.batch, a.image_size, rank, procs)), hvd.shutdown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["ddp", "horovod", "single"])
    p.add_argument("--batch", type=int, default=48, help="global batch (images per step over all processes)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--fp16-compression", action=argparse.BooleanOptionalAction, default=True,
                   help="horovod: fp16 gradients on the wire (as hvdtrain's default)")
    a = p.parse_args()
    one_thread()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    rank, procs, step, teardown = run(a)
    times = time_steps(step, a.warmup, a.steps)  # no barrier: the gradient all-reduce keeps ranks in step
    if rank == 0:
        s = median(times)
        emit({"name": f"resnet50-{a.mode}", "procs": procs, "batch": a.batch, "image_size": a.image_size,
              "step_s": s, "images_s": a.batch / s,
              **({"fp16_compression": a.fp16_compression} if a.mode == "horovod" else {})})
    teardown()


if __name__ == "__main__":
    main()
