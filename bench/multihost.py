"""Benchmarks across 2 emulated hosts joined by a 1 Gbit/s link (network namespaces; needs root).

    .venv/bin/python bench/multihost.py [--rate 1gbit] [--repeats 15] [--steps 30]

1. Gradient all-reduce of 16 and 64 MB between the 2 hosts (1 rank each): fp32, Horovod's
   Compression.fp16, hvdhybrid's fp16 (bench/allreduce.py), ratios to fp32 in the same run; once
   with the all-reduce rules hvdhybrid gives MPI when each rank has a host of its own, once with
   Open MPI's own choice. The same for 16 MB across 4 hosts (1 rank each).
2. The 2-host hybrid job (2 bundles x 2 stages, ``hvdtrain mlp``), median step time:
   fp16 compression on vs off, and stages kept on a host (``--map-by slot``) vs split across the
   hosts (``--map-by node``), for a gradient-heavy and an activation-heavy model; next to each,
   the bytes per step that ``hvdhybrid.layout.traffic`` says cross the link.
3. ``--reduce after`` against ``--reduce overlap`` (the gradient average across bundles during the last
   backward) on the gradient-heavy model, batch 256, stages on a host, for 1F1B with 1 and 2
   microbatches and ZB-V (2 stages per rank), in interleaved rounds (``--only-overlap``: only these;
   ``--batch`` sets their batch, ``--own-cores`` gives each emulated host a core of its own).
4. ``hvdtrain launch --elastic``: the recovery time after every process of h1 is killed, cut into
   detection, relaunch, checkpoint load and the first step (``--only-recovery``: only this).

Prints ``BENCH {json}`` lines (bench/run.py collects them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from common import emit  # noqa: E402

from hvdhybrid.layout.hostfile import Host, place_ranks  # noqa: E402
from hvdhybrid.layout.topology import Layout  # noqa: E402
from hvdhybrid.layout.traffic import ModelSizes, cross_host_bytes, link_bytes  # noqa: E402
from hvdhybrid.testing.netemu import EmulatedHosts, unavailable  # noqa: E402

MPIRUN = ["mpirun", "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]
# (name, hidden, depth, batch): the 8x8-digits MLP, 64 inputs, 10 classes
MODELS = [("gradient-heavy", 1024, 8, 64), ("activation-heavy", 256, 4, 1024)]


def _env(hosts: EmulatedHosts) -> dict[str, str]:
    env = hosts.env()
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    return env


def _bench_lines(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("BENCH ")]


def allreduce(hosts: EmulatedHosts, rate: str, repeats: int, openmpi_choice: bool = False,
              mb: str = "16,64") -> list[dict]:
    """One rank per host: hvdhybrid's MPI settings, or (``openmpi_choice``) Open MPI's own choice."""
    env = _env(hosts)
    if openmpi_choice:  # a user's coll_tuned setting wins over hvdhybrid's rules (hvdhybrid/comm/mpi_env.py)
        env["OMPI_MCA_coll_tuned_use_dynamic_rules"] = "0"
    cmd = MPIRUN + ["-np", str(hosts.n), "--map-by", "node", "--hostfile", hosts.hostfile(), sys.executable,
                    os.path.join(HERE, "allreduce.py"), "--mb", mb, "--repeats", str(repeats),
                    "--tag", rate]
    p = hosts.run(cmd, timeout=900, env=env, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"allreduce benchmark failed:\n{p.stderr[-3000:]}")
    return _bench_lines(p.stdout)


def _params(hidden: int, depth: int) -> int:
    dims = [64] + [hidden] * (depth - 1) + [10]
    return sum(a * b + b for a, b in zip(dims, dims[1:]))


def job(hosts: EmulatedHosts, name: str, hidden: int, depth: int, batch: int, map_by: str, fp16: bool,
        steps: int, extra: tuple[str, ...] = ("--microbatches", "2")) -> dict:
    out = os.path.join(tempfile.mkdtemp(prefix="bench-mh-"), "run")
    cmd = MPIRUN + ["-np", "4", "--map-by", map_by, "--hostfile", hosts.hostfile(), sys.executable, "-m",
                    "hvdhybrid", "mlp", "--stages", "2", "--hidden", str(hidden), "--depth", str(depth),
                    "--batch-size", str(batch), *extra, "--steps", str(steps),
                    "--fp16-compression" if fp16 else "--no-fp16-compression", "--no-progress", "--out", out]
    p = hosts.run(cmd, timeout=900, env=_env(hosts), cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"hybrid job failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    step_s = statistics.median(batch / r["samples_per_s"] for r in rows[5:])
    layout = Layout(4, (1, 1))
    ranks = place_ranks([Host(h, 2) for h in hosts.hosts], 4, map_by)
    # activations per global batch across a boundary: batch x hidden floats
    sizes = ModelSizes.even(4.0 * _params(hidden, depth), 2, 4.0 * batch * hidden, fp16)
    return {"name": f"hybrid-{name}", "model": f"mlp hidden {hidden} depth {depth}", "batch": batch,
            "map_by": map_by, "fp16": fp16, "step_s": step_s, "extra": " ".join(extra),
            "network_mb_per_step": cross_host_bytes(link_bytes(layout, ranks, sizes)) / 1e6}


#: --reduce after against overlap: (schedule flags) on the gradient-heavy model, batch 256
OVERLAP = [("1f1b", ("--microbatches", "1")), ("1f1b", ("--microbatches", "2")),
           ("zbv", ("--microbatches", "2", "--stages-per-rank", "2"))]


def overlap(hosts: EmulatedHosts, steps: int, rounds: int = 2, batch: int = 256) -> list[dict]:
    """The reduce after the schedule against the one overlapped with the backward, interleaved rounds."""
    out = []
    for r in range(rounds):
        for sched, flags in OVERLAP:
            for mode in ("after", "overlap"):
                row = job(hosts, "overlap", 1024, 8, batch, "slot", True, steps,
                          (*flags, "--schedule", sched, "--reduce", mode))
                out.append(dict(row, name=f"overlap-{sched}-{mode}", reduce=mode, schedule=sched, round=r))
    return out


def recovery(hosts: EmulatedHosts, steps: int = 400) -> dict:
    """``hvdtrain launch --elastic`` on 2 hosts (2 bundles x 2 stages, a checkpoint every step): every
    process of h1 killed mid-run; the time from the kill to the first step after the resume on h0, cut
    into detection (kill to the launcher's failure event), relaunch (to the resume's start: the layout
    fit, mpirun, start-up), checkpoint load, and the first step."""
    import subprocess
    import time

    out = os.path.join(tempfile.mkdtemp(prefix="bench-elastic-"), "run")
    cmd = [sys.executable, "-m", "hvdhybrid", "launch", "-np", "4", "--elastic", "--hostfile",
           hosts.hostfile(), "--cooldown", "600", "--", "mlp", "--stages", "2", "--hidden", "1024", "--depth",
           "8", "--batch-size", "64", "--microbatches", "2", "--steps", str(steps), "--checkpoint-every", "1",
           "--keep", "2", "--no-progress", "--out", out]

    def lines() -> list[dict]:
        try:
            return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if x.strip()]
        except (OSError, ValueError):
            return []
    proc = hosts.popen(cmd, env=_env(hosts), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while sum("step" in x for x in lines()) < 5:
            if proc.poll() is not None:
                raise SystemExit("the elastic job ended before h1 was killed")
            time.sleep(0.2)
        killed = time.time()
        hosts.kill_host("h1")
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = lines()
    shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    failure = next(x for x in rows if x.get("event") == "failure")
    resumed = next(x for x in rows if x.get("event") == "resumed")
    first = next(x for x in rows if "step" in x and x["time"] > resumed["time"])
    parts = {"detection_s": failure["time"] - killed,
             "relaunch_s": resumed["time"] - resumed["load_s"] - failure["time"],
             "load_s": resumed["load_s"], "first_step_s": first["time"] - resumed["time"]}
    return {"name": "elastic-recovery", "total_s": first["time"] - killed, **parts,
            "state_mb": 4 * 2 * _params(1024, 8) / 2**20, "rc": proc.returncode}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--only-overlap", action="store_true", help="Only the --reduce after/overlap rows.")
    ap.add_argument("--only-recovery", action="store_true", help="Only the elastic recovery time.")
    ap.add_argument("--batch", type=int, default=256, help="The --reduce after/overlap rows' batch.")
    ap.add_argument("--own-cores", action="store_true",
                    help="Each emulated host on a core of its own (taskset; host i on core i modulo the "
                    "cores), not all on all of the machine's.")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    cpus = [str(i) for i in range(cores)] if a.own_cores else None  # host i on core i % cores
    why = unavailable()
    if why:
        raise SystemExit(f"cannot emulate hosts here: {why}")
    if a.only_recovery:
        with EmulatedHosts(2, slots=2, rate=a.rate, cpus=cpus) as hosts:
            emit(recovery(hosts))
        return
    if a.only_overlap:
        with EmulatedHosts(2, slots=2, rate=a.rate, cpus=cpus) as hosts:
            for r in overlap(hosts, a.steps, batch=a.batch):
                emit(r)
        return
    with EmulatedHosts(2, slots=2, rate=a.rate, cpus=cpus) as hosts:
        emit(recovery(hosts))
        for r in overlap(hosts, a.steps):
            emit(r)
        for openmpi_choice in (False, True):
            for r in allreduce(hosts, a.rate, a.repeats, openmpi_choice):
                emit(r)
        for name, hidden, depth, batch in MODELS:
            for map_by, fp16 in (("slot", True), ("slot", False), ("node", True)):
                emit(job(hosts, name, hidden, depth, batch, map_by, fp16, a.steps))
    with EmulatedHosts(4, slots=1, rate=a.rate, cpus=cpus) as hosts:  # a data group of 4 across 4 hosts
        for openmpi_choice in (False, True):
            for r in allreduce(hosts, a.rate, max(3, a.repeats // 2), openmpi_choice, mb="16"):
                emit(r)


if __name__ == "__main__":
    main()
