"""The step-time stall of a checkpoint: written in the background (--checkpoint-async) against in the step
(--checkpoint-sync), measured against the same run without checkpoints.

    python bench/checkpoint_stall.py [--ranks 2] [--threads 0] [--hidden 4096] [--steps 13] [--every 4]

``hvdtrain mlp`` (about 34 M parameters with --hidden 4096: 135 MB of parameters and 135 MB of SGD
momentum) as 2 stages on 2 ranks, or on 1 rank with ``--threads 1`` (a core left for the writing
thread, as a GPU host leaves its CPU cores: on 2 ranks of this 2-core machine the writing thread
takes its CPU time from training). A checkpoint at step s costs the loop what step s+1's time shows beyond the
run without checkpoints; the stall per checkpoint is the whole loop's extra time over the checkpoints
made inside it (the one at the end, after the last step, is not in the loop). The three modes alternate
``--rounds`` times (this machine's speed drifts); the median of the rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODES = {"none": [], "sync": ["--checkpoint-sync"], "async": ["--checkpoint-async"]}


def one(mode: str, ranks: int, threads: int, hidden: int, steps: int, every: int) -> dict[str, float]:
    out = os.path.join(tempfile.mkdtemp(prefix="bench-ckpt-"), "run")
    cmd = ["mpirun", "-np", str(ranks), "--oversubscribe", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
           sys.executable, "-m", "hvdhybrid", "mlp", "--stages", str(ranks), "--threads", str(threads),
           "--hidden", str(hidden), "--depth", "4",
           "--batch-size", "64", "--steps", str(steps),
           "--checkpoint-every", str(every if mode != "none" else 0),
           "--keep", "2", "--no-progress", "--out", out, *MODES[mode]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    mem = json.load(open(os.path.join(out, "memory.json")))
    shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    steps_rows = [r for r in rows if "step" in r]
    return {"loop_s": steps_rows[-1]["elapsed_s"] - steps_rows[0]["elapsed_s"],
            "state_mb": sum(r["parameters"] + r["optimizer"] for r in mem) / 2**20}


def _flag(ranks: int, threads: int) -> str:
    return f"{ranks} rank(s)" + (f", {threads} thread(s)" if threads else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    inside = len([s for s in range(1, a.steps) if s % a.every == 0 and s > 1])  # after step 1: timed
    got: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for _ in range(a.rounds):
        for mode in MODES:
            got[mode].append(one(mode, a.ranks, a.threads, a.hidden, a.steps, a.every))
    base = statistics.median(r["loop_s"] for r in got["none"])
    stall = {m: (statistics.median(r["loop_s"] for r in got[m]) - base) / inside for m in ("sync", "async")}
    state = got["sync"][0]["state_mb"]
    for m in ("sync", "async"):
        print("BENCH " + json.dumps({"name": f"checkpoint-{m}", "ranks": _flag(a.ranks, a.threads),
                                     "state_mb": state, "checkpoints": inside, "stall_s": stall[m],
                                     "loop_s_none": base,
                                     "async_over_sync": stall["async"] / stall["sync"] if stall["sync"] > 0
                                     else None}), flush=True)


if __name__ == "__main__":
    main()
