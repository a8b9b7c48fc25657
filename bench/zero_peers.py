"""Peers of `hvdtrain gpt2 --zero`: torch's ZeroRedundancyOptimizer (over DDP) and FSDP2 (`fully_shard`),
gloo on the CPU, the same GPT-2 shape and global batch. Run by ``bench/run.py --only zero`` under
``torchrun --nproc-per-node 2``; prints one ``BENCH {json}`` line from rank 0 (median step seconds).

    torchrun --nproc-per-node 2 bench/zero_peers.py --mode zero --size mini --seq-len 256 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("zero", "fsdp2"), required=True)
    ap.add_argument("--size", default="mini")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8, help="global rows per step")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()

    import torch
    import torch.distributed as dist
    from transformers import GPT2LMHeadModel

    from hvdhybrid.models.gpt2.model import hf_config

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_config(a.size, 0.1))
    if a.mode == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-4,
                                      weight_decay=0.01)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        net = fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    rows = a.batch_size // world
    times = []
    for step in range(3 + a.steps):
        ids = torch.randint(0, 256, (a.batch_size, a.seq_len), generator=g)[rank * rows:(rank + 1) * rows]
        t0 = time.perf_counter()
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        if step >= 3:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        print("BENCH " + json.dumps({"mode": a.mode, "step_s": statistics.median(times)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
