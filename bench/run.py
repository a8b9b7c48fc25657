"""Run every benchmark in one go and print ratios against the peers measured in the same run.

    .venv/bin/python bench/run.py [--out DIR] [--only PART ...]

PART: pipeline, grover, grover-stream, memory, bert, gpt2, gpt, multihost, resnet, zero, checkpoint
(repeat --only for several).

Writes into DIR (default docs/results/bench-all; with --only, docs/results/bench-PART-...):
results.json, results.md (the tables below, as printed), scaling.png (each run
against its peer) and pipeline-timeline.png (from a --trace of a 2-stage pipeline run).

Timings never fail anything: this prints, it does not judge. Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable


def _env() -> dict[str, str]:
    # yield_when_idle: what hvdhybrid sets for itself, given to the MPI peers (plain Horovod) too
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}:{HERE}", HF_HUB_OFFLINE="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_mpi_yield_when_idle="1")
    return env


def _run(cmd: list[str]) -> list[dict]:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    if p.returncode:
        print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"benchmark failed: {' '.join(cmd)}")
    return [json.loads(line[6:]) for line in p.stdout.splitlines() if line.startswith("BENCH ")]


def mpirun(n: int, script: str, *args: str, flags: tuple[str, ...] = ()) -> list[str]:
    return ["mpirun", "-np", str(n), "--oversubscribe", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
            "-x", "HF_HUB_OFFLINE", *flags, PY, os.path.join(HERE, script), *args]


def _hvdtrain_bert(precision: str, batch: int, max_len: int, steps: int, warmup: int) -> dict:
    """`hvdtrain bert` on 2 bundles: the median step time of its metrics.jsonl after ``warmup`` steps."""
    import statistics
    import tempfile

    out = os.path.join(tempfile.mkdtemp(prefix="bench-bert-"), "run")
    cmd = ["mpirun", "-np", "2", "--oversubscribe", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x",
           "HF_HUB_OFFLINE", PY, "-m", "hvdhybrid", "bert", "--steps", str(steps + warmup), "--batch-size",
           str(batch), "--max-len", str(max_len), "--limit", "2048", "--precision", precision,
           "--clip-grad", "0", "--lr", "2e-5", "--no-progress", "--out", out]
    _run(cmd)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    step_s = statistics.median(batch / r["samples_per_s"] for r in rows[warmup:])
    return {"name": "bert-hvdhybrid", "procs": 2, "batch": batch, "max_len": max_len, "precision": precision,
            "step_s": step_s, "samples_s": batch / step_s}


def bert(steps: int = 10, warmup: int = 2, batch: int = 32, max_len: int = 64) -> list[dict]:
    """BERT fine-tuning samples/s: hvdtrain bert on 2 bundles against DDP, Horovod, Accelerate, 1 process."""
    peers = os.path.join(HERE, "bert_peers.py")
    opts = ["--batch", str(batch), "--max-len", str(max_len), "--steps", str(steps), "--warmup", str(warmup)]
    torchrun = shutil.which("torchrun", path=os.path.dirname(PY)) or "torchrun"
    accelerate = shutil.which("accelerate", path=os.path.dirname(PY)) or "accelerate"
    res: list[dict] = []
    for prec in ("fp32", "bf16"):
        p = [*opts, "--precision", prec]
        res.append(_hvdtrain_bert(prec, batch, max_len, steps, warmup))
        res += _run([PY, peers, "single", *p])
        res += _run([torchrun, "--nproc-per-node", "2", peers, "ddp", *p])
        res += _run(mpirun(2, "bert_peers.py", "horovod", *p))
        res += _run(mpirun(2, "bert_peers.py", "horovod", "--no-fp16-compression", *p))
        res += _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no", peers, "accelerate", *p])
    print(f"\nBERT fine-tuning (all-MiniLM-L6-v2, 2 labels), global batch {batch}, {max_len} tokens, "
          "AdamW, 2 processes x 1 thread unless noted\n")
    print("| run | precision | s/step | samples/s | vs fastest 2-process peer |")
    print("|---|---|---|---|---|")
    for prec in ("fp32", "bf16"):
        rows = [r for r in res if r["precision"] == prec]
        peers_2 = [r for r in rows if r["procs"] == 2 and r["name"] != "bert-hvdhybrid"]
        best = max(r["samples_s"] for r in peers_2)
        for r in rows:
            name = r["name"] + (" (no fp16 compression)" if r.get("fp16_compression") is False else "")
            print(f"| {name} | {prec} | {r['step_s']:.3f} | {r['samples_s']:.1f} "
                  f"| {r['samples_s'] / best:.2f}x |")
    ours = {r["precision"]: r["step_s"] for r in res if r["name"] == "bert-hvdhybrid"}
    print(f"\nhvdtrain bert bf16 vs fp32 step time: {ours['fp32'] / ours['bf16']:.2f}x faster")
    return res


def _hvdtrain_resnet(np_: int, layout: list[str], batch: int, image_size: int, steps: int, warmup: int
                     ) -> dict:
    """`hvdtrain resnet --arch resnet50` on ``np_`` ranks: the median step time after ``warmup`` steps."""
    import statistics
    import tempfile

    out = os.path.join(tempfile.mkdtemp(prefix="bench-resnet-"), "run")
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", PY,
           "-m", "hvdhybrid", "resnet", "--arch", "resnet50", *layout, "--steps", str(steps + warmup),
           "--batch-size", str(batch), "--image-size", str(image_size), "-m", "4", "--no-progress",
           "--out", out]
    _run(cmd)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    step_s = statistics.median(batch / r["samples_per_s"] for r in rows[warmup:])
    return {"name": "resnet50-hvdhybrid", "procs": np_,
            "layout": " ".join(layout), "batch": batch, "image_size": image_size, "step_s": step_s,
            "images_s": batch / step_s}


def resnet(steps: int = 6, warmup: int = 2, batch: int = 48, image_size: int = 32) -> list[dict]:
    """ResNet-50 images/s: hvdtrain at bundle shape 2,1 (3 ranks) and 2 bundles x 1,1 (4 ranks) against
    torch DDP (gloo) and plain Horovod on the same ranks and global batch, and one process."""
    peers = os.path.join(HERE, "resnet_peers.py")
    opts = ["--batch", str(batch), "--image-size", str(image_size), "--steps", str(steps),
            "--warmup", str(warmup)]
    torchrun = shutil.which("torchrun", path=os.path.dirname(PY)) or "torchrun"
    res = _run([PY, peers, "single", *opts])
    shape11 = ["--bundle-shape", "1,1"]
    by_procs = ((3, [["--bundle-shape", "2,1"]]), (4, [shape11, [*shape11, "--partition", "params"]]))
    for np_, layouts in by_procs:
        for layout in layouts:  # the default --partition of resnet50 is time
            res.append(_hvdtrain_resnet(np_, layout, batch, image_size, steps, warmup))
        res += _run([torchrun, "--nproc-per-node", str(np_), peers, "ddp", *opts])
        res += _run(mpirun(np_, "resnet_peers.py", "horovod", *opts))
    one = res[0]["images_s"]
    print(f"\nResNet-50 (GroupNorm, 10 classes), global batch {batch} of {image_size}x{image_size} images, "
          "SGD, 1 thread per process; hvdtrain: 4 microbatches, fp16 compression across bundles; "
          "Horovod: fp16 compression\n")
    print("| run | processes | layout | s/step | images/s | vs one process | vs the best peer on as many "
          "processes |")
    print("|---|---|---|---|---|---|---|")
    for r in res:
        same = [p["images_s"] for p in res if p["procs"] == r["procs"] and "hvdhybrid" not in p["name"]]
        vs = f"{r['images_s'] / max(same):.2f}x" if r["procs"] > 1 else ""
        print(f"| {r['name']} | {r['procs']} | {r.get('layout', 'data parallel')} | {r['step_s']:.3f} "
              f"| {r['images_s']:.1f} | {r['images_s'] / one:.2f}x | {vs} |")
    return res


def _memory_run(np_: int, args: list[str]) -> dict:
    """`hvdtrain gpt2` on ``np_`` ranks: its memory.json (every rank), metrics.jsonl rows and the median
    step time after the first two steps."""
    import tempfile

    out = os.path.join(tempfile.mkdtemp(prefix="bench-zero-"), "run")
    _run(["mpirun", "-np", str(np_), "--oversubscribe", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", PY, "-m",
          "hvdhybrid", "gpt2", *args, "--no-progress", "--out", out])
    mem = json.load(open(os.path.join(out, "memory.json")))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    t = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows[1:], rows[2:])]
    return {"memory": mem, "rows": rows, "step_s": statistics.median(t) if t else None}


def _planned(np_: int, args: list[str]) -> dict:
    """`hvdtrain plan -np N gpt2 ARGS --json`: rank -> predicted figures."""
    out = subprocess.run([PY, "-m", "hvdhybrid", "plan", "-np", str(np_), "--json", "gpt2", *args],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=_env())
    if out.returncode:
        raise RuntimeError(f"hvdtrain plan failed: {out.stderr[-1500:]}")
    pred = json.loads(out.stdout[out.stdout.index("{"):])
    return {r: pos for pos in pred["positions"] for r in pos["ranks"]}


FIGURES = ("parameters", "gradients", "optimizer", "activations_peak")


def _plan_error(np_: int, args: list[str], measured: list[dict]) -> float:
    """Largest relative error of the plan against a run, over every rank and figure (0 for 0 vs 0)."""
    pred = _planned(np_, args)
    worst = 0.0
    for m in measured:
        for f in FIGURES:
            p, g = pred[m["rank"]][f], m[f]
            worst = max(worst, abs(p - g) / g if g else float(p != 0))
    return worst


def zero(size: str = "mini", steps: int = 8) -> list[dict]:
    """--zero and --recompute: bytes per parameter per rank against the ZeRO formulas, saved-activation
    peaks, the plan's predictions against every run, step times against ZeroRedundancyOptimizer and
    FSDP2, and the gpt2-medium headline (peak RSS per rank against one process)."""
    base = ["--size", size, "--seq-len", "256", "--microbatches", "1", "--limit", "256",
            "--steps", str(steps), "--optimizer", "adamw"]
    res: list[dict] = []
    print("\nBytes per parameter per rank (parameters + gradients after the sync + optimizer state, "
          f"from the tensors held), gpt2 {size}, fp32 AdamW, 4 rows per bundle; the plan's largest "
          "error over every figure and rank; median s/step\n")
    print("| --zero | bundles (d) | measured bytes/param | formula | measured / formula | plan error "
          "| s/step |")
    print("|---|---|---|---|---|---|---|")
    for d in (2, 4):
        for level in (0, 1, 2):
            args = [*base, "--batch-size", str(4 * d), "--zero", str(level)]
            run = _memory_run(d, args)
            m = run["memory"]
            n = m[0]["parameters"] / 4
            per = max((r["parameters"] + r["gradients"] + r["optimizer"]) / n for r in m)
            formula = {0: 16.0, 1: 8 + 8 / d, 2: 4 + 12 / d}[level]
            err = _plan_error(d, args, m)
            res.append({"name": f"zero{level}-d{d}", "bytes_per_param": per, "formula": formula,
                        "plan_error": err, "step_s": run["step_s"],
                        "rss_peak": max(r["rss_peak"] for r in m)})
            print(f"| {level} | {d} | {per:.2f} | {formula:.2f} | {per / formula:.3f} | {err:.3f} "
                  f"| {run['step_s']:.3f} |")
    print("\nPeers on 2 processes, same model and global batch (8 rows), gloo on the CPU\n")
    print("| run | s/step | hvdtrain --zero 1 vs it |")
    print("|---|---|---|")
    z1 = next(r["step_s"] for r in res if r["name"] == "zero1-d2")
    z0 = next(r["step_s"] for r in res if r["name"] == "zero0-d2")
    print(f"| hvdtrain --zero 0 | {z0:.3f} | {z1 / z0:.2f}x |")
    for mode in ("zero", "fsdp2"):
        t = _run(["torchrun", "--nproc-per-node", "2", os.path.join(HERE, "zero_peers.py"),
                  "--mode", mode, "--size", size, "--seq-len", "256", "--batch-size", "8",
                  "--steps", str(steps)])[0]["step_s"]
        name = {"zero": "torch ZeroRedundancyOptimizer (DDP)", "fsdp2": "torch FSDP2 fully_shard"}[mode]
        res.append({"name": f"peer-{mode}", "step_s": t})
        print(f"| {name} | {t:.3f} | {z1 / t:.2f}x |")
    print(f"\nSaved activations peak and step time (median of {2 * steps} steps; one process: the faster of "
          f"2 alternating rounds), gpt2 {size}, 4 rows of 256 tokens, 2 microbatches, dropout 0.1, one "
          "process; and 2 stages x 2 bundles (1f1b, 4 microbatches)\n")
    print("| --recompute | ranks | saved activations peak (MB) | vs none | s/step | vs none | plan error |")
    print("|---|---|---|---|---|---|---|")
    for np_, extra in ((1, ["--batch-size", "4", "--microbatches", "2"]),
                       (4, ["--batch-size", "8", "--microbatches", "4", "--stages", "2", "--zero", "1"])):
        first: dict = {}
        rounds = 2 if np_ == 1 else 1  # the modes alternate; each keeps its faster round (drift, noise)
        runs: dict[str, dict] = {}
        for _ in range(rounds):
            for mode in ("none", "full", "selective"):
                run = _memory_run(np_, [*base, *extra, "--recompute", mode, "--steps", str(2 * steps + 2)])
                if mode not in runs or run["step_s"] < runs[mode]["step_s"]:
                    runs[mode] = run
        for mode, run in runs.items():
            args = [*base, *extra, "--recompute", mode]
            peak = max(r["activations_peak"] for r in run["memory"])
            first = first or {"peak": peak, "step_s": run["step_s"]}
            err = _plan_error(np_, args, run["memory"])
            res.append({"name": f"recompute-{mode}-np{np_}", "activations_peak": peak,
                        "step_s": run["step_s"], "plan_error": err})
            print(f"| {mode} | {np_} | {peak / 2**20:.1f} | {peak / first['peak']:.3f} | {run['step_s']:.3f} "
                  f"| {run['step_s'] / first['step_s']:.2f}x | {err:.3f} |")
    res += headline()
    return res


def headline() -> list[dict]:
    """gpt2-medium with AdamW: peak RSS per rank of one process against tensor 2 x 2 bundles,
    --zero 2, --recompute full (2 microbatches, their gradients sent once per step or per microbatch
    with --reduce microbatch; and 1 microbatch); and RSS against what the accounting counts plus the
    libraries at rest."""
    probe = ("import hvdhybrid.allocator as a; a.reexec(); "  # under the allocator hvdtrain's ranks use
             "import torch, mpi4py.MPI, horovod.torch, transformers, hvdhybrid.cli.main; "
             "from hvdhybrid.training.memory import peak_rss; print(peak_rss())")
    got = subprocess.run([PY, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=_env())
    rest = int(got.stdout.split()[-1])  # bytes
    args = ["--size", "gpt2-medium", "--seq-len", "128", "--batch-size", "4", "--limit", "100",
            "--steps", "2", "--optimizer", "adamw", "--sample-tokens", "0"]  # the run's peak is training's
    print(f"\ngpt2-medium (303.6 M parameters), AdamW, 2 steps of 4 x 128 bytes; libraries at rest "
          f"{rest / 1e6:.0f} MB (measured once); peak RSS from each rank's memory.json\n")
    print("| run | ranks | peak RSS per rank (MB) | vs one process | accounted + rest (MB) "
          "| RSS / (accounted + rest) | plan error |")
    print("|---|---|---|---|---|---|---|")
    res, one = [], 0
    layout = ["--tensor", "2", "--zero", "2", "--recompute", "full"]
    for np_, extra in ((1, []), (4, layout), (4, [*layout, "--reduce", "microbatch"]),
                       (4, [*layout, "--microbatches", "1"])):
        m = _memory_run(np_, [*args, *extra])["memory"]
        rss = max(r["rss_peak"] for r in m)
        acc = max(sum(r[f] for f in FIGURES) for r in m) + rest
        one = one or rss
        err = _plan_error(np_, [*args, *extra], m)
        name = "one process" if np_ == 1 else " ".join(["tensor 2 x 2 bundles", *extra[2:]])
        mbs = extra[-1] if "--microbatches" in extra else "2"
        per = "-per-microbatch" if "microbatch" in extra else ""
        res.append({"name": f"headline-np{np_}-mb{mbs}{per}", "rss_peak": rss, "accounted_plus_rest": acc,
                    "plan_error": err})
        print(f"| {name} | {np_} | {rss / 1e6:.0f} | {rss / one:.2f}x | {acc / 1e6:.0f} "
              f"| {rss / acc:.2f}x | {err:.3f} |")
    return res


def grover() -> list[dict]:
    """GROVER finetuning molecules/s: task parallel (2 ranks) and 2 bundles, against 1 rank."""
    res: list[dict] = []
    res += _run([PY, os.path.join(HERE, "grover_throughput.py"), "plain", "1"])
    res += _run([PY, os.path.join(HERE, "grover_throughput.py"), "plain", "2"])
    res += _run(mpirun(1, "grover_throughput.py", "one", "1"))
    res += _run(mpirun(1, "grover_throughput.py", "one", "2"))
    res += _run(mpirun(2, "grover_throughput.py", "tp", "1"))
    res += _run(mpirun(2, "grover_throughput.py", "tp", "2"))
    res += _run(mpirun(2, "grover_throughput.py", "tp", "4"))
    res += _run(mpirun(2, "grover_throughput.py", "dp", "1"))
    by = {r["name"]: r for r in res}
    one = by["grover-hvdhybrid-one-m1"]["mol_s"]
    print(f"\nGROVER {res[0].get('batch')} molecules per step (config from GROVER_BENCH_CONFIG, "
          "default small), 1 thread per rank unless noted\n")
    print("| run | ranks | microbatches | molecules/s | vs hvdhybrid on 1 rank (1 microbatch) |")
    print("|---|---|---|---|---|")
    for r in res:
        extra = f" ({r['threads']} threads)" if r["threads"] > 1 else ""
        print(f"| {r['name']}{extra} | {r['ranks']} | {r.get('microbatches', 1)} | {r['mol_s']:.1f} "
              f"| {r['mol_s'] / one:.2f}x |")
    return res


def gpt2() -> list[dict]:
    """GPT-2 small step time: tensor 2 (2 ranks x 1 thread) against one rank with 1 and 2 threads."""
    res: list[dict] = []
    res += _run(mpirun(1, "gpt2_tensor.py", "--threads", "1"))
    two = mpirun(1, "gpt2_tensor.py", "--threads", "2")
    res += _run(two[:3] + ["--bind-to", "none"] + two[3:])  # mpirun binds 1 rank to 1 core by default
    res += _run(mpirun(2, "gpt2_tensor.py", "--tensor", "2"))
    one = res[0]["step_s"]
    r0 = res[0]
    print(f"\nGPT-2 {r0['size']} (byte vocabulary), batch {r0['batch']} x {r0['seq']} tokens, AdamW\n")
    print("| run | s/step | speedup vs 1 rank, 1 thread | tensor-parallel communication |")
    print("|---|---|---|---|")
    for r in res:
        print(f"| tensor {r['tensor']}, {r['threads']} thread(s) per rank | {r['step_s']:.2f} "
              f"| {one / r['step_s']:.2f}x | {r['comm_s']:.3f} s ({100 * r['comm_share']:.1f}%) |")
    return res


def gpt() -> list[dict]:
    """TeraPipe: one sequence per step through 2 stages; no slicing, uniform slicings, the planned one."""
    res = _run(mpirun(2, "gpt_slices.py", "--config", "small", "--seq", "2048", "--uniform", "4,8,16,32"))
    by = {r["name"]: r for r in res}
    none, planned = by["gpt-slices-none"]["step_s"], by["gpt-slices-planned"]["step_s"]
    best = min((r for r in res if r["name"].startswith("gpt-slices-uniform")), key=lambda r: r["step_s"])
    r0 = res[0]
    print(f"\nGPT {r0['config']}, one sequence of {r0['seq']} tokens per step, 2 stages "
          "(2 ranks x 1 thread), GPipe, AdamW\n")
    print("| slicing | s/step | vs no slicing | predicted s/step | measured / predicted |")
    print("|---|---|---|---|---|")
    for r in res:
        if "predicted_s" in r:
            sl = r["slices"]
            shown = f" ({','.join(map(str, sl))})" if len(sl) < 12 else ""
            name = r["name"].replace("gpt-slices-", "") + shown
            print(f"| {name} | {r['step_s']:.3f} | {none / r['step_s']:.2f}x | {r['predicted_s']:.3f} "
                  f"| {r['step_s'] / r['predicted_s']:.2f} |")
    print(f"| one process, whole model (peer) | {by['gpt-one-process']['step_s']:.3f} | "
          f"{none / by['gpt-one-process']['step_s']:.2f}x | | |")
    print(f"\nplanned vs no slicing {none / planned:.2f}x; planned vs the best uniform ({best['name'][11:]}) "
          f"{best['step_s'] / planned:.2f}x")
    return res


def checkpoint() -> list[dict]:
    """The stall of a checkpoint of 270 MB of state: in the background against in the step; on 2 ranks of
    2 cores (the writing thread competes with training), and on 1 rank of 1 thread (a core free)."""
    res = _run([PY, os.path.join(HERE, "checkpoint_stall.py")])
    res += _run([PY, os.path.join(HERE, "checkpoint_stall.py"), "--ranks", "1", "--threads", "1"])
    print("\nCheckpoint stall per checkpoint (hvdtrain mlp --hidden 4096; loop time beyond the same run "
          "without checkpoints)\n")
    print("| ranks | writes | state MB | stall s | async / sync |\n|---|---|---|---|---|")
    for r in res:
        print(f"| {r['ranks']} | {r['name'].split('-')[1]} | {r['state_mb']:.0f} | {r['stall_s']:.3f} | "
              f"{r['async_over_sync']:.2f} |")
    return res


def memory() -> list[dict]:
    """Peak RSS per rank: a 4-stage pipeline of a ~1 GB MLP (keyed build, build-then-drop) vs 1 process."""
    return _run([PY, os.path.join(HERE, "memory.py"), "--width", "6144", "--depth", "9"])


HVD_SCHEDULES = ["gpipe", "1f1b", "zb1", "zb1:1:1", "1f1b:2", "interleaved", "zbv", "zbv:2:8", "vhalf",
                 "vhalf:2:8"]
"""SCHEDULE[:V[:N]]: V stages per rank, N microbatches per W (no N: the default, zb1 batches all)."""
GPT2_SCHEDULES = ["gpipe", "1f1b", "zb1", "zb1:1:1", "interleaved", "zbv", "zbv:2:8"]


def _same_allocator() -> tuple[str, ...]:
    """Every runner of the schedule bench under the allocator hvdtrain's ranks use (jemalloc, where
    installed): measured on the bench MLP, glibc's malloc made every runner 1.2-1.4x slower, ours and
    torch's alike (fresh pages for each freed activation). Returns mpirun's -x flags for it."""
    sys.path.insert(0, ROOT)
    from hvdhybrid import allocator

    lib = allocator.library()
    if lib is None:
        print("jemalloc is not installed: every runner on the C library's allocator", file=sys.stderr)
        return ()
    os.environ.update(allocator.preload_env({}, lib))
    return ("-x", "LD_PRELOAD", "-x", "MALLOC_CONF")


def pipeline(skip_torch: bool = False) -> list[dict]:
    """The bench MLP and GPT-2 small, each on 2 ranks, 8 microbatches: every hvdhybrid schedule (2 stages,
    or 4 virtual stages) against one process and every torch.distributed.pipelining schedule on the same
    split; point-to-point throughput against raw mpi4py."""
    before = dict(os.environ)
    flags = _same_allocator()
    res: list[dict] = []
    try:
        for model, names in (("mlp", HVD_SCHEDULES), ("gpt2", GPT2_SCHEDULES)):
            res += _run([PY, os.path.join(HERE, "single.py"), "--model", model])
            # GPT-2 small: a process per schedule (all built in one process ran out of the 24 GB here)
            for group in ([names] if model == "mlp" else [[n] for n in names]):
                res += _run(mpirun(2, "hvdhybrid_pipeline.py", "--model", model, *group, flags=flags))
            if not skip_torch:
                torchrun = shutil.which("torchrun", path=os.path.dirname(PY)) or "torchrun"
                res += _run([torchrun, "--nproc-per-node", "2", os.path.join(HERE, "torch_pipelining.py"),
                             "--model", model])
    finally:
        os.environ.clear()
        os.environ.update(before)
    res += _run(mpirun(2, "p2p_throughput.py"))
    for model in ("mlp", "gpt2"):
        _pipeline_table(res, "" if model == "mlp" else f"{model}-")
    print("\n| message | raw mpi4py GB/s | hvdhybrid GB/s | ratio |")
    print("|---|---|---|---|")
    for r in res:
        if r["name"] == "p2p":
            print(f"| {r['mb']} MB | {r['raw_GBps']:.2f} | {r['hvdhybrid_GBps']:.2f} | {r['ratio']:.2f} |")
    return res


def _pipeline_table(res: list[dict], prefix: str) -> None:
    """One model's rows (names starting with ``prefix``; the MLP's have none) and hvdhybrid's best
    against torch's best and one process."""
    def mine(name: str) -> bool:
        return name.startswith(prefix) if prefix else not name.startswith("gpt2-")

    by = {r["name"][len(prefix):]: r for r in res if "step_s" in r and mine(r["name"])}
    ideal = 2 * 8 / (8 + 2 - 1)
    single, single_mb = by["single"]["step_s"], by["single-microbatched"]["step_s"]
    print(f"\n{prefix.rstrip('-') or 'mlp'}:\n")
    print("| run | stages | s/step | speedup vs 1 process (full batch) | % of ideal 1.78x "
          "| speedup vs 1 process (8 microbatches) |")
    print("|---|---|---|---|---|---|")
    for name, r in by.items():
        st = r["step_s"]
        pct = "" if name.startswith("single") else f"{100 * single / st / ideal:.0f}%"
        print(f"| {name} | {r.get('stages', 1)} | {st:.3f} | {single / st:.2f}x | {pct} "
              f"| {single_mb / st:.2f}x |")
    for r in res:
        if "error" in r and mine(r["name"]):
            print(f"| {r['name']} | | failed: {r['error']} | | | |")
    ours = {k: v["step_s"] for k, v in by.items() if k.startswith("hvdhybrid-")}
    peers = {k: v["step_s"] for k, v in by.items() if k.startswith("torch-")}
    if ours and peers:
        best, peer = min(ours, key=ours.__getitem__), min(peers, key=peers.__getitem__)
        print(f"\nhvdhybrid's best ({best}, {ours[best]:.3f} s) vs torch's best ({peer}, "
              f"{peers[peer]:.3f} s): {peers[peer] / ours[best]:.2f}x faster; vs one process on the full "
              f"batch: {single / ours[best]:.2f}x")


MPI_CHOICE = {"hvdhybrid-rules": "hvdhybrid's rules",
              "openmpi-choice": "Open MPI's own choice"}


def multihost() -> list[dict]:
    """Across emulated hosts at 1 Gbit/s: fp16 all-reduce (2 and 4 hosts) and the 2-host hybrid job (root)."""
    sys.path.insert(0, ROOT)
    from hvdhybrid.testing.netemu import unavailable

    why = unavailable()
    if why:
        print(f"\nmulti-host benchmarks skipped: {why}")
        return []
    res = _run([PY, os.path.join(HERE, "multihost.py")])
    print("\nGradient all-reduce between emulated hosts (1 rank each) over 1 Gbit/s links\n")
    print("| hosts | gradients | MPI all-reduce algorithm | fp32 s | Horovod fp16 s (vs fp32) | "
          "hvdhybrid fp16 s (vs fp32) | hvdhybrid vs Horovod fp16 | hvdhybrid fp16 vs fastest fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for ranks, mb in sorted({(r["ranks"], r["mb"]) for r in res if "mb" in r}):
        mine = [r for r in res if r.get("mb") == mb and r.get("ranks") == ranks]
        f32_best = min(r["median_s"] for r in mine if r["name"] == "allreduce-fp32")
        for mpi, label in MPI_CHOICE.items():
            row = {r["name"]: r for r in mine if r.get("mpi") == mpi}
            if not row:
                continue
            f32, h16, o16 = (row[f"allreduce-{k}"] for k in ("fp32", "horovod-fp16", "hvdhybrid-fp16"))
            print(f"| {ranks} | {mb:.0f} MB | {label} | {f32['median_s']:.3f} | {h16['median_s']:.3f} "
                  f"({h16['vs_fp32']:.2f}x) | {o16['median_s']:.3f} ({o16['vs_fp32']:.2f}x) | "
                  f"{o16['median_s'] / h16['median_s']:.2f}x | {o16['median_s'] / f32_best:.2f}x |")
    _overlap_table(res)
    print("\nThe 2-host hybrid job (2 bundles x 2 stages, hvdtrain mlp), median step time\n")
    print("| model | ranks onto hosts | fp16 compression | s/step | vs stages on a host, compressed "
          "| MB/step on the link (traffic model) |")
    print("|---|---|---|---|---|---|")
    for name in sorted({r["name"] for r in res if r["name"].startswith("hybrid-") and "reduce" not in r}):
        rows = [r for r in res if r["name"] == name]
        base = next(r for r in rows if r["map_by"] == "slot" and r["fp16"])["step_s"]
        for r in rows:
            where = "stages on a host (--map-by slot)" if r["map_by"] == "slot" else \
                "stages split across hosts (--map-by node)"
            print(f"| {r['model']}, batch {r['batch']} | {where} | {'on' if r['fp16'] else 'off'} | "
                  f"{r['step_s']:.4f} | {r['step_s'] / base:.2f}x | {r['network_mb_per_step']:.3g} |")
    return res


def _overlap_table(res: list[dict]) -> None:
    """--reduce after vs overlap over the emulated link: the median over rounds of each, and the ratio."""
    rows = [r for r in res if r.get("reduce")]
    if not rows:
        return
    print("\n--reduce after vs overlap, 2 hosts x (2 bundles x 2 stages), stages on a host, fp16, "
          "hvdtrain mlp hidden 1024 depth 8, batch 256; median s/step of each round\n")
    print("| schedule | flags | after s/step | overlap s/step | overlap faster by |")
    print("|---|---|---|---|---|")
    for extra in dict.fromkeys(r["extra"].replace(" --reduce overlap", "").replace(" --reduce after", "")
                               for r in rows):
        def med(mode: str, extra: str = extra) -> float:
            return statistics.median(r["step_s"] for r in rows if r["reduce"] == mode and
                                     r["extra"] == f"{extra} --reduce {mode}")
        after, over = med("after"), med("overlap")
        sched = extra.split("--schedule ")[1].split()[0]
        print(f"| {sched} | {extra} | {after:.3f} | {over:.3f} | {after / over:.2f}x |")


def trace_timeline(out_dir: str) -> list[dict]:
    """A traced 2-stage pipeline run (hvdtrain mlp, 1F1B, 8 microbatches) drawn as a timeline."""
    import tempfile

    tmp = tempfile.mkdtemp(prefix="bench-trace-")
    trace = os.path.join(out_dir, "pipeline-trace.json")
    _run(["mpirun", "-np", "2", "--oversubscribe", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", PY, "-m",
          "hvdhybrid", "mlp", "--stages", "2", "--hidden", "1024", "--depth", "8", "--batch-size", "256",
          "--microbatches", "8", "--steps", "6", "--no-progress", "--trace", trace, "--out",
          os.path.join(tmp, "run")])
    shutil.rmtree(tmp, ignore_errors=True)
    from plots import timeline

    n = timeline(trace, os.path.join(out_dir, "pipeline-timeline.png"))
    print(f"\npipeline timeline: {n} events from {trace} -> pipeline-timeline.png")
    return []


def speedups(res: list[dict]) -> list[dict]:
    """The rows of the scaling chart: each run against its peer measured in the same run."""
    by = {r["name"]: r for r in res if "name" in r}
    out = []

    def add(label: str, ours: str, peer: str, key: str = "step_s", ideal: Optional[float] = None,
            higher_is_better: bool = False) -> None:
        if ours in by and peer in by:
            a, b = by[ours][key], by[peer][key]
            row = {"label": label, "speedup": (a / b) if higher_is_better else (b / a)}
            out.append({**row, "ideal": ideal} if ideal else row)

    add("pipeline 2 ranks, 1F1B vs 1 process", "hvdhybrid-1f1b", "single", ideal=16 / 9)
    add("pipeline 1F1B vs torch.distributed.pipelining", "hvdhybrid-1f1b", "torch-1f1b")
    add("GPT 2 stages, planned slices vs none", "gpt-slices-planned", "gpt-slices-none")
    add("GPT-2 small, tensor 2 vs 1 rank", "gpt2-tensor2-threads1", "gpt2-tensor1-threads1", ideal=2.0)
    add("GROVER task parallel 2 ranks vs 1", "grover-hvdhybrid-tp-m1", "grover-hvdhybrid-one-m1", "mol_s",
        ideal=2.0, higher_is_better=True)
    add("GROVER 2 bundles vs 1 rank", "grover-hvdhybrid-dp-m1", "grover-hvdhybrid-one-m1", "mol_s",
        ideal=2.0, higher_is_better=True)
    for mb in (16.0, 64.0):
        rows = {r["name"]: r for r in res
                if r.get("mb") == mb and r.get("mpi") == "hvdhybrid-rules" and r.get("ranks") == 2}
        if rows:
            out.append({"label": f"{mb:.0f} MB all-reduce at 1 Gbit/s, hvdhybrid fp16 vs fp32",
                        "speedup": 1 / rows["allreduce-hvdhybrid-fp16"]["vs_fp32"], "ideal": 2.0})
    return out


def grover_stream() -> list[dict]:
    """GROVER pretraining streamed from MOSES through the CLI: molecules/s, data waits, RSS."""
    import grover_stream as gs

    return gs.main()


def planner() -> list[dict]:
    """The planner against measured runs on 4 ranks, on this host and on 2 emulated hosts x 2 ranks at
    1 Gbit/s (each host on its own core): the bench MLP, GPT-2 tiny and mini (bench/planner_accuracy.py;
    the tables and rows in docs/results/planner/)."""
    mlp = ["mlp", "--hidden", "1024", "--depth", "8", "--batch-size", "256"]
    tiny = ["gpt2", "--size", "tiny", "--seq-len", "64", "--batch-size", "32", "--limit", "512",
            "--sample-tokens", "0"]
    mini = ["gpt2", "--size", "mini", "--seq-len", "128", "--batch-size", "8", "--limit", "256",
            "--sample-tokens", "0"]
    res = []
    for name, hosts, sample, steps, cmd in (("mlp", 1, 16, 10, mlp), ("gpt2-tiny", 1, 16, 10, tiny),
                                            ("gpt2-mini", 1, 12, 8, mini), ("mlp", 2, 16, 10, mlp),
                                            ("gpt2-tiny", 2, 16, 10, tiny)):
        base = os.path.join(ROOT, "docs", "results", "planner",
                            f"{name}-np4" + ("-2hosts" if hosts > 1 else ""))
        with open(base + ".md", "w") as table:
            subprocess.run([PY, os.path.join(HERE, "planner_accuracy.py"), "-np", "4", "--hosts", str(hosts),
                            "--sample", str(sample), "--steps", str(steps), "--json", base + ".json", "--",
                            *cmd, "--no-fp16-compression"], cwd=ROOT, env=_env(), timeout=3600, check=True,
                           stdout=table)
        got = json.load(open(base + ".json"))
        res.append({"name": f"planner-{name}-{hosts}host", "spearman": got["spearman"],
                    "memory_error": got["memory_error"], "pick_vs_fastest": got.get("pick_vs_fastest")})
    return res


PARTS: dict[str, Callable[[], list[dict]]] = {
    "pipeline": pipeline, "grover": grover, "grover-stream": grover_stream, "memory": memory, "bert": bert,
    "gpt2": gpt2, "gpt": gpt,
    "multihost": multihost, "resnet": resnet, "zero": zero, "checkpoint": checkpoint, "planner": planner,
}


class _Tee:
    """stdout that is also kept, for the markdown file."""

    def __init__(self) -> None:
        self.out, self.kept = sys.stdout, io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", help="directory for results.json, results.md and the PNG plots (default: "
                    "docs/results/bench-all, or with --only docs/results/bench-PART-..., so that a "
                    "partial run never overwrites the whole one)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--skip-torch", action="store_true", help="skip the torch.distributed peer")
    ap.add_argument("--only", choices=sorted(PARTS), action="append",
                    help="run only this part (repeat for more)")
    a = ap.parse_args()
    if a.out is None:
        a.out = os.path.join(ROOT, "docs", "results", "bench-" + ("-".join(a.only) if a.only else "all"))
    os.makedirs(a.out, exist_ok=True)
    tee = _Tee()
    sys.stdout = tee  # type: ignore[assignment]
    res: list[dict] = []
    try:
        for name, fn in PARTS.items():
            if a.only is None or name in a.only:
                res += pipeline(a.skip_torch) if name == "pipeline" else fn()
                with open(os.path.join(a.out, "results.json"), "w") as f:  # kept part by part
                    json.dump(res, f, indent=2)
        if a.only is None or "pipeline" in a.only:
            trace_timeline(a.out)
        from plots import scaling

        rows = speedups(res)
        if rows:
            scaling(rows, os.path.join(a.out, "scaling.png"))
            print("\n| run | speedup against its peer (same run) | ideal |\n|---|---|---|")
            for r in rows:
                ideal = f"{r['ideal']:.2f}x" if "ideal" in r else ""
                print(f"| {r['label']} | {r['speedup']:.2f}x | {ideal} |")
    finally:
        sys.stdout = tee.out
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(f"# Benchmark results\n\n`{' '.join(sys.argv)}`\n\n```\n" + tee.kept.getvalue() + "```\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"\nresults in {a.out}: results.json, results.md, *.png")


if __name__ == "__main__":
    main()
