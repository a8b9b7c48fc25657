"""Run every benchmark in one go and print ratios against the peers measured in the same run.

    .venv/bin/python bench/run.py [--json results.json] [--only pipeline|grover|memory|bert|gpt2|gpt]

Timings never fail anything: this prints, it does not judge. Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

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


def mpirun(n: int, script: str, *args: str) -> list[str]:
    return ["mpirun", "-np", str(n), "--oversubscribe", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
            "-x", "HF_HUB_OFFLINE", PY, os.path.join(HERE, script), *args]


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


def memory() -> list[dict]:
    """Peak RSS per rank: a 4-stage pipeline of a ~1 GB MLP (keyed build, build-then-drop) vs 1 process."""
    return _run([PY, os.path.join(HERE, "memory.py"), "--width", "6144", "--depth", "9"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--skip-torch", action="store_true", help="skip the torch.distributed peer")
    ap.add_argument("--only", choices=["pipeline", "grover", "memory", "bert", "gpt2", "gpt"],
                    help="run one part only")
    a = ap.parse_args()
    res: list[dict] = []
    for part, fn in (("gpt", gpt), ("gpt2", gpt2), ("bert", bert), ("memory", memory)):
        if a.only in (None, part):
            res += fn()
            if a.only == part:
                if a.json:
                    with open(a.json, "w") as f:
                        json.dump(res, f, indent=2)
                return
    gres = grover() if a.only != "pipeline" else []
    if a.only == "grover":
        if a.json:
            with open(a.json, "w") as f:
                json.dump(gres, f, indent=2)
        return
    res += _run([PY, os.path.join(HERE, "single.py")])
    res += _run(mpirun(2, "hvdhybrid_pipeline.py", "1f1b"))
    res += _run(mpirun(2, "hvdhybrid_pipeline.py", "gpipe"))
    if not a.skip_torch:
        torchrun = shutil.which("torchrun", path=os.path.dirname(PY)) or "torchrun"
        res += _run([torchrun, "--nproc-per-node", "2", os.path.join(HERE, "torch_pipelining.py")])
    res += _run(mpirun(2, "p2p_throughput.py"))
    by = {r["name"]: r for r in res if "step_s" in r}
    ideal = 2 * 8 / (8 + 2 - 1)
    single, single_mb = by["single"]["step_s"], by["single-microbatched"]["step_s"]
    print("\n| run | s/step | speedup vs 1 process (full batch) | % of ideal 1.78x "
          "| speedup vs 1 process (8 microbatches) |")
    print("|---|---|---|---|---|")
    for name, r in by.items():
        s = r["step_s"]
        pct = "" if name.startswith("single") else f"{100 * single / s / ideal:.0f}%"
        print(f"| {name} | {s:.3f} | {single / s:.2f}x | {pct} | {single_mb / s:.2f}x |")
    if "torch-pipelining-1f1b" in by:
        t = by["torch-pipelining-1f1b"]["step_s"]
        print(f"\nhvdhybrid 1F1B vs torch.distributed.pipelining Schedule1F1B: "
              f"{t / by['hvdhybrid-1f1b']['step_s']:.2f}x faster")
    print("\n| message | raw mpi4py GB/s | hvdhybrid GB/s | ratio |")
    print("|---|---|---|---|")
    for r in res:
        if r["name"] == "p2p":
            print(f"| {r['mb']} MB | {r['raw_GBps']:.2f} | {r['hvdhybrid_GBps']:.2f} | {r['ratio']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res + gres, f, indent=2)


if __name__ == "__main__":
    main()
