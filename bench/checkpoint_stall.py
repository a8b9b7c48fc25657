"""The step-time stall of a checkpoint: written in the background (--checkpoint-async) against in the step
(--checkpoint-sync), measured against the same run without checkpoints.

    python bench/checkpoint_stall.py [--ranks 2] [--threads 0] [--hidden 4096] [--steps 17] [--every 4]

``hvdtrain mlp`` (about 34 M parameters with --hidden 4096: 135 MB of parameters and 135 MB of SGD
momentum) as 2 stages on 2 ranks, or on 1 rank with ``--threads 1`` (a core left for the writing
thread, as a GPU host leaves its CPU cores: on 2 ranks of this 2-core machine the writing thread
takes its CPU time from training). A checkpoint at step s costs the loop what step s+1's time shows beyond the
run without checkpoints; the stall per checkpoint is the whole loop's extra time over the checkpoints
made inside it (the one at the end, after the last step, is not in the loop). The three modes alternate
``--rounds`` times (this machine's speed drifts); the median of the rounds is reported.

Each checkpoint's own stall is its stretch of the loop (from its step to the next checkpoint's)
against the same stretch without checkpoints: ``first_s`` is the first one of the run, which also
pays for the copy's memory being touched for the first time (0.2-0.6 s on this VM, once per run: the
later copies reuse it), ``later_s`` the median of the others, the stall a long run pays per checkpoint.
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
    at = {int(r["step"]): float(r["elapsed_s"]) for r in rows if "step" in r}
    marks = [s for s in range(every, steps + 1, every)] + [steps]
    got = {"loop_s": at[steps] - at[1],
           "state_mb": sum(r["parameters"] + r["optimizer"] for r in mem) / 2**20}
    for a, b in zip(marks, marks[1:]):
        if b > a:
            got[f"seg{a}"] = at[b] - at[a]
    return got


def _flag(ranks: int, threads: int) -> str:
    return f"{ranks} rank(s)" + (f", {threads} thread(s)" if threads else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=17)
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
    segs = sorted((k for k in got["none"][0] if k.startswith("seg")), key=lambda k: int(k[3:]))
    each = {m: [statistics.median(r[k] for r in got[m]) - statistics.median(r[k] for r in got["none"])
                for k in segs] for m in ("sync", "async")}
    later = {m: statistics.median(each[m][1:]) if len(each[m]) > 1 else None for m in each}
    state = got["sync"][0]["state_mb"]
    for m in ("sync", "async"):
        print("BENCH " + json.dumps({"name": f"checkpoint-{m}", "ranks": _flag(a.ranks, a.threads),
                                     "state_mb": state, "checkpoints": inside, "stall_s": stall[m],
                                     "first_s": each[m][0], "later_s": later[m], "loop_s_none": base,
                                     "async_over_sync": _ratio(stall["async"], stall["sync"]),
                                     "later_async_over_sync": _ratio(later["async"], later["sync"])}),
              flush=True)


def _ratio(a: object, b: object) -> object:
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None


if __name__ == "__main__":
    main()
