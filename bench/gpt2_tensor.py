"""Step time of a GPT-2 at tensor 2 against one rank, and the share of tensor-parallel communication.

    mpirun -np 1 python bench/gpt2_tensor.py --threads 1     # one rank, 1 thread
    mpirun -np 1 python bench/gpt2_tensor.py --threads 2     # one rank, 2 threads
    mpirun -np 2 python bench/gpt2_tensor.py --tensor 2      # tensor 2, 1 thread each

Rank 0 prints one ``BENCH {json}`` line: name, size, tensor, threads, batch, seq, step_s (median),
comm_s (median seconds per step in tensor-parallel collectives), comm_share.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import emit

import hvdhybrid as hh
from hvdhybrid.models.gpt2.model import hf_config, hf_model
from hvdhybrid.parallel import tensor_parallel
from hvdhybrid.training.data import TensorDataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="gpt2-small")
    ap.add_argument("--tensor", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    groups = hh.init(tensor=a.tensor)
    staged = hh.parallelize_gpt2(hf_model(hf_config(a.size, dropout=0.1), 0), groups)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (a.batch * 4, a.seq + 1), generator=g)
    data = TensorDataset(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    cfg = hh.TrainConfig(steps=a.steps + a.warmup, batch_size=a.batch, microbatches=1, progress=False)
    trainer = hh.Trainer(groups, staged, lambda p: torch.optim.AdamW(p, lr=1e-4), cfg)
    sampler = hh.Sampler(len(data), a.batch, seed=0)
    steps, comms = [], []
    for i in range(a.steps + a.warmup):
        c0, t0 = tensor_parallel.COMM_SECONDS[0], time.perf_counter()
        trainer.train_step(data, sampler.next())
        if i >= a.warmup:
            steps.append(time.perf_counter() - t0)
            comms.append(tensor_parallel.COMM_SECONDS[0] - c0)
    if groups.world.Get_rank() == 0:
        s, c = statistics.median(steps), statistics.median(comms)
        emit({"name": f"gpt2-tensor{a.tensor}-threads{a.threads}", "size": a.size, "tensor": a.tensor,
              "threads": a.threads, "batch": a.batch, "seq": a.seq, "step_s": s, "comm_s": c,
              "comm_share": c / s})
    hh.finish(groups)


if __name__ == "__main__":
    main()
