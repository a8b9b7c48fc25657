"""Gradient all-reduce across the ranks: fp32, Horovod's Compression.fp16, and hvdhybrid's fp16.

    mpirun -np 2 python bench/allreduce.py --mb 16,64 [--repeats 15]

Gradients are 16 tensors adding up to ``--mb`` megabytes of float32 (as a model's are); every
variant averages the same tensors, alternating in rounds so that drift in the machine hits all
alike. Rank 0 prints one ``BENCH {json}`` line per size and variant: median seconds, the spread,
and the ratio to fp32 in the same run.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from typing import Any, Callable

import horovod.torch as hvd
import torch
from common import emit

from hvdhybrid.comm import mpi_env
from hvdhybrid.comm.fp16_allreduce import Fp16Allreduce


def grads(mb: float, parts: int = 16) -> list[torch.Tensor]:
    n = int(mb * 2 ** 20 / 4 / parts)
    g = torch.Generator().manual_seed(hvd.rank())
    return [torch.randn(n, generator=g) * 1e-3 for _ in range(parts)]


def plain(ts: list[torch.Tensor], name: str, compression: Any) -> None:
    """Horovod's grouped all-reduce (average) with ``compression``, copied back into ``ts``."""
    out = hvd.grouped_allreduce(ts, name=name, op=hvd.Average, compression=compression)
    for t, o in zip(ts, out):
        t.copy_(o)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", default="16,64")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--tag", default="", help="a label for the link (e.g. 1gbit)")
    ap.add_argument("--bucket-mb", type=float, default=None,
                    help="hvdhybrid's bucket size (default: its own)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    hvd.init()
    # which all-reduce algorithms MPI was given: hvdhybrid's rules (a host per rank) or its own
    mpi = "hvdhybrid-rules" if mpi_env.rules_given(os.environ) else "openmpi-choice"
    for mb in map(float, a.mb.split(",")):
        ts = grads(mb)
        kw = {} if a.bucket_mb is None else {"bucket_mb": a.bucket_mb}
        ours = Fp16Allreduce(hvd.global_process_set, f"ours{mb}", **kw)
        variants: dict[str, Callable[[], None]] = {
            "fp32": functools.partial(plain, ts, f"fp32.{mb}", hvd.Compression.none),
            "horovod-fp16": functools.partial(plain, ts, f"hfp16.{mb}", hvd.Compression.fp16),
            "hvdhybrid-fp16": functools.partial(ours, ts)}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(a.repeats + 2):
            for k, fn in variants.items():
                hvd.allreduce(torch.zeros(1), name="barrier")
                t0 = time.perf_counter()
                fn()
                if r >= 2:
                    times[k].append(time.perf_counter() - t0)
        if hvd.rank() == 0:
            base = statistics.median(times["fp32"])
            for k, v in times.items():
                med = statistics.median(v)
                emit({"name": f"allreduce-{k}", "mb": mb, "ranks": hvd.size(), "link": a.tag, "mpi": mpi,
                      "median_s": med, "p25_s": sorted(v)[len(v) // 4], "p75_s": sorted(v)[3 * len(v) // 4],
                      "vs_fp32": med / base, "buckets": ours.num_buckets if k == "hvdhybrid-fp16" else None})
    hvd.shutdown()


if __name__ == "__main__":
    main()
