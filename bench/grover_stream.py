"""GROVER pretraining streamed from MOSES, through the CLI: molecules/s per layout, the time the trainer
waits for featurising, and peak RSS per rank for a 100k and a 1M-molecule corpus.

    .venv/bin/python bench/grover_stream.py [--steps N] [--config small]

(``bench/run.py --only grover-stream`` runs it and prints the tables.) Each run is `hvdtrain grover
pretrain --corpus moses` under mpirun; molecules/s and the wait share are those of rank 0 after a
warm-up, read from its metrics.jsonl (the wait share is rank 0's: it reads data in every layout).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from grover_chembl import _env as chembl_env

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable

# (name, ranks, layout options): data, task and task x pipeline layouts at 1, 2 and 4 ranks
LAYOUTS = [
    ("1 rank", 1, []),
    ("data 2", 2, []),
    ("task 2", 2, ["--task-parallel"]),
    ("data 4", 4, []),
    ("task 2 x data 2", 4, ["--task-parallel"]),
    ("task 2 x pipeline 2", 4, ["--task-parallel", "--stages", "2", "--layers", "4"]),
]


def _env() -> dict[str, str]:
    return dict(chembl_env(), PYTHONPATH=ROOT)


def pretrain(ranks: int, layout: list[str], steps: int, config: str, *extra: str) -> dict:
    """One run; returns molecules/s and wait share over the steps after a quarter of warm-up, and RSS."""
    tmp = tempfile.mkdtemp(prefix="bench-grover-stream-")
    out = os.path.join(tmp, "run")
    cmd = ["mpirun", "-np", str(ranks), "--oversubscribe", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
           PY, "-m", "hvdhybrid", "grover", "pretrain", "--corpus", "moses", "--config", config,
           "--steps", str(steps), "--batch-size", "32", "--no-progress", "--out", out, *layout, *extra]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if p.returncode:
        print(p.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"benchmark failed: {' '.join(cmd)}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    k = len(rows) // 4
    a, b = rows[k - 1], rows[-1]
    window = b["elapsed_s"] - a["elapsed_s"]
    waited = b["data_wait"] * b["elapsed_s"] - a["data_wait"] * a["elapsed_s"]
    memory = json.load(open(os.path.join(out, "memory.json")))
    worker = re.search(r"workers' peak RSS ([0-9.]+) MB", p.stderr)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"mol_s": 32 * (b["step"] - a["step"]) / window, "wait_share": waited / window,
            "rss_peak": max(m["rss_peak"] for m in memory),
            "worker_rss_peak": float(worker.group(1)) * 1e6 if worker else 0.0}


def main() -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--config", default="small")
    a, _ = ap.parse_known_args()
    res: list[dict] = []
    print(f"\nGROVER pretraining on MOSES (config {a.config}, batch 32, 2 microbatches, {a.steps} steps, "
          "1 featurising worker per rank unless noted); molecules/s after a quarter of the steps\n")
    print("| layout | ranks | molecules/s | vs 1 rank | trainer waits for data | peak RSS/rank MB |")
    print("|---|---|---|---|---|---|")
    one = 0.0
    runs = [(n, r, lay, ["--workers", "1"]) for n, r, lay in LAYOUTS]
    runs += [("1 rank, featurising inline (--workers 0)", 1, [], ["--workers", "0"]),
             ("data 2, featurising inline (--workers 0)", 2, [], ["--workers", "0"])]
    for name, ranks, layout, extra in runs:
        r = pretrain(ranks, layout, a.steps, a.config, *extra)
        one = one or r["mol_s"]
        res.append({"name": f"grover-stream {name}", "ranks": ranks, **r})
        print(f"| {name} | {ranks} | {r['mol_s']:.1f} | {r['mol_s'] / one:.2f}x | {r['wait_share']:.1%} "
              f"| {r['rss_peak'] / 1e6:.0f} |", flush=True)
    print("\nPeak RSS per rank against the corpus size (data 2, 1 worker per rank, the same steps)\n")
    print("| corpus | rank peak RSS MB | worker peak RSS MB |\n|---|---|---|")
    sizes = {}
    for n in (100_000, 1_000_000):
        r = pretrain(2, [], a.steps, a.config, "--max-molecules", str(n), "--workers", "1")
        sizes[n] = r
        res.append({"name": f"grover-stream rss {n}", "ranks": 2, **r})
        print(f"| {n:,} molecules | {r['rss_peak'] / 1e6:.0f} | {r['worker_rss_peak'] / 1e6:.0f} |",
              flush=True)
    ratio = sizes[1_000_000]["rss_peak"] / sizes[100_000]["rss_peak"]
    print(f"\n1M / 100k molecules: rank peak RSS {ratio:.3f}x (goal: within 10%)")
    return res


if __name__ == "__main__":
    main()
