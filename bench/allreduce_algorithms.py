"""Open MPI's all-reduce algorithms between emulated hosts (1 rank each), against the wire time.

    .venv/bin/python bench/allreduce_algorithms.py [--hosts 2] [--rate 1gbit] [--mb 16,32,64] [--repeats 5]

For Open MPI's own choice and each algorithm forced in turn (coll_tuned_allreduce_algorithm 3
recursive doubling, 4 ring, 5 segmented ring, 6 Rabenseifner), Horovod's fp32 all-reduce of one
tensor: median seconds and the ratio to the wire time of a ring all-reduce, 2 (n-1)/n of the bytes
at the link's rate. This is how hvdhybrid/openmpi-allreduce.rules was chosen (docs/performance.md).
Needs root (network namespaces). Prints one markdown row per algorithm and size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ALGORITHMS = {"0": "Open MPI's own choice", "3": "recursive doubling", "4": "ring", "5": "segmented ring",
              "6": "Rabenseifner"}
RATES = {"gbit": 1e9, "mbit": 1e6}


def worker(sizes: list[float], repeats: int) -> None:
    """Under mpirun: time Horovod's fp32 all-reduce of each size; rank 0 prints 'MB seconds' lines."""
    import horovod.torch as hvd
    import torch

    torch.set_num_threads(1)
    hvd.init()
    for mb in sizes:
        x = torch.ones(int(mb * 2 ** 20 / 4))
        times = []
        for r in range(repeats + 1):
            hvd.allreduce(torch.zeros(1), name="barrier")
            t0 = time.perf_counter()
            hvd.allreduce_(x, op=hvd.Sum, name=f"a{mb}")
            if r:
                times.append(time.perf_counter() - t0)
        if hvd.rank() == 0:
            print(f"TIME {mb} {statistics.median(times)}", flush=True)
    hvd.shutdown()


def rate_bits(rate: str) -> float:
    for unit, scale in RATES.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise SystemExit(f"--rate {rate!r}: use a number followed by gbit or mbit, e.g. 1gbit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--mb", default="16,32,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sizes = [float(m) for m in a.mb.split(",")]
    if a.worker:
        return worker(sizes, a.repeats)
    sys.path.insert(0, ROOT)
    from hvdhybrid.testing.netemu import EmulatedHosts, unavailable

    why = unavailable()
    if why:
        raise SystemExit(f"cannot emulate hosts here: {why}")
    bits = rate_bits(a.rate)
    print(f"{a.hosts} hosts x 1 rank, {a.rate} links, Horovod fp32 all-reduce, median of {a.repeats}\n")
    print("| algorithm | MB | seconds | x ring wire time |\n|---|---|---|---|")
    with EmulatedHosts(a.hosts, slots=1, rate=a.rate) as hosts:
        for alg, label in ALGORITHMS.items():
            env = hosts.env()
            env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, OMPI_MCA_coll_tuned_use_dynamic_rules="1",
                       OMPI_MCA_coll_tuned_allreduce_algorithm=alg)
            cmd = ["mpirun", "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-np", str(a.hosts),
                   "--map-by", "node", "--hostfile", hosts.hostfile(), sys.executable,
                   os.path.abspath(__file__), "--worker", "--mb", a.mb, "--repeats", str(a.repeats)]
            p = hosts.run(cmd, timeout=900, env=env, cwd=ROOT)
            if p.returncode:
                raise SystemExit(f"algorithm {alg} failed:\n{p.stderr[-3000:]}")
            for line in p.stdout.splitlines():
                if line.startswith("TIME "):
                    mb, s = map(float, line.split()[1:])
                    wire = 2 * (a.hosts - 1) / a.hosts * mb * 2 ** 20 * 8 / bits
                    print(f"| {alg} {label} | {mb:g} | {s:.3f} | {s / wire:.2f} |", flush=True)


if __name__ == "__main__":
    main()
