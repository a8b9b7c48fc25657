"""The planner against measured runs: ``hvdtrain plan --auto`` predicts every layout of N ranks; a
sample of them (spread over the ranking, the planner's pick first) is trained for a few steps; the
Spearman rank correlation of predicted and measured step time, the memory predicted against each run's
memory.json, and the planner's pick against the fastest run measured.

    .venv/bin/python bench/planner_accuracy.py -np 4 --sample 8 -- mlp --hidden 1024 --depth 8 \
        --batch-size 256
    .venv/bin/python bench/planner_accuracy.py -np 4 --hosts 2 --rate 1gbit ...   # 2 emulated hosts

With ``--hosts N`` the ranks run on N emulated hosts (network namespaces joined by a ``--rate`` link,
each host on its own core of this machine), the planner measures their links through the hostfile and
weighs both ``--map-by`` values, and each layout trains with the one it was planned for.
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
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    if n < 2:
        return float("nan")
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def _run(cmd: list[str], hosts: Any, timeout: float) -> subprocess.CompletedProcess:
    """``cmd`` here, or on the emulated hosts' launch node."""
    if hosts is None:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=timeout)
    return hosts.run(cmd, timeout=timeout, env={**hosts.env(), "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
                     cwd=ROOT)


def measure(np_: int, command: list[str], options: list[str], steps: int, hosts: Any = None,
            map_by: str = "") -> dict:
    out = os.path.join(tempfile.mkdtemp(prefix="bench-plan-"), "run")
    where = ["--hostfile", hosts.hostfile(), "--map-by", map_by or "slot"] if hosts is not None else []
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe", *where, "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
           PY, "-m", "hvdhybrid", *command, *options, "--steps", str(steps), "--no-progress", "--out", out]
    res = _run(cmd, hosts, 900)
    if res.returncode:
        shutil.rmtree(os.path.dirname(out), ignore_errors=True)
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    mem = json.load(open(os.path.join(out, "memory.json")))
    shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    t = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows[2:], rows[3:])]
    figs = ("parameters", "gradients", "optimizer", "activations_peak")
    return {"step_s": statistics.median(t), "accounted": max(sum(r[f] for f in figs) for r in mem),
            "rss": max(r["rss_peak"] for r in mem)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-np", type=int, default=4)
    ap.add_argument("--sample", type=int, default=8, help="layouts trained (0: every one)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="each layout trained this many times, in "
                    "alternating order; its fastest round counts")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--hosts", type=int, default=1,
                    help="emulated hosts (network namespaces, needs root), each on its own core")
    ap.add_argument("--rate", default="1gbit", help="their link's rate (with --hosts)")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    command = [c for c in a.command if c != "--"]
    if a.hosts > 1:
        sys.path.insert(0, ROOT)
        from hvdhybrid.testing.netemu import EmulatedHosts

        cores = os.cpu_count() or 1
        with EmulatedHosts(a.hosts, slots=a.np // a.hosts, rate=a.rate,
                           cpus=[str(i) for i in range(cores)]) as hosts:  # host i on core i % cores
            _accuracy(a, command, hosts)
    else:
        _accuracy(a, command, None)


def _accuracy(a: argparse.Namespace, command: list[str], hosts: Any) -> None:
    where = ["--hostfile", hosts.hostfile()] if hosts is not None else []
    res = _run([PY, "-m", "hvdhybrid", "plan", "-np", str(a.np), "--auto", "--json", "--top", "100000",
                *where,
                *command], hosts, 1800)
    if res.returncode:
        sys.exit(res.stderr)
    got = json.loads(res.stdout[res.stdout.index("{"):])
    ranked = got["ranked"]
    n = len(ranked) if a.sample <= 0 else min(a.sample, len(ranked))
    picks = sorted({round(i * (len(ranked) - 1) / max(1, n - 1)) for i in range(n)})
    rows = []
    print(f"{got['layouts']} layouts weighed, {len(ranked)} fit; training {len(picks)} of them "
          f"({a.steps} steps each, fastest of {a.rounds} rounds)", flush=True)
    print("| rank | layout | predicted s/step | measured s/step | predicted MB | accounted + rest MB "
          "| RSS MB |")
    print("|---|---|---|---|---|---|---|")
    runs: dict[int, list[dict]] = {i: [] for i in picks}
    for rnd in range(a.rounds):  # rounds alternate the order; each layout keeps its fastest round
        for i in (picks if rnd % 2 == 0 else picks[::-1]):
            r = ranked[i]
            runs[i].append(measure(a.np, command, r["options"], a.steps, hosts, r.get("map_by", "")))
    for i in picks:
        r = ranked[i]
        good = [m for m in runs[i] if "error" not in m]
        m = min(good, key=lambda x: x["step_s"]) if good else runs[i][0]
        rows.append({"rank": i + 1, "describe": r["describe"], "options": r["options"],
                     "predicted_s": r["step_s"], "predicted_memory": r["memory"], **m,
                     "rounds_s": [x["step_s"] for x in good],
                     "predicted": {k: v for k, v in r.items() if k not in ("choice", "positions")}})
        if "error" in m:
            print(f"| {i + 1} | {r['describe']} | {r['step_s']:.4f} | failed: {m['error']} | | | |",
                  flush=True)
            continue
        acc = m["accounted"] + got["rest"]
        print(f"| {i + 1} | {r['describe']} | {r['step_s']:.4f} | {m['step_s']:.4f} "
              f"| {r['memory'] / 2**20:.0f} | {acc / 2**20:.0f} | {m['rss'] / 2**20:.0f} |", flush=True)
    ok = [r for r in rows if "error" not in r]
    rho = spearman([r["predicted_s"] for r in ok], [r["step_s"] for r in ok])
    fastest = min(ok, key=lambda r: r["step_s"])
    chosen = next((r for r in ok if r["rank"] == 1), None)
    mem_err = max(abs(r["predicted_memory"] - (r["accounted"] + got["rest"])) / (r["accounted"] + got["rest"])
                  for r in ok)
    print(f"\nSpearman (predicted vs measured step time, {len(ok)} layouts): {rho:.3f} (goal >= 0.9)")
    print(f"memory: predicted vs accounted + rest, worst {100 * mem_err:.1f}% (goal within 10%)")
    if chosen:
        print(f"planner's pick {chosen['step_s']:.4f} s vs fastest measured {fastest['step_s']:.4f} s "
              f"({fastest['describe']}): {chosen['step_s'] / fastest['step_s']:.2f}x (goal within 1.05x)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": command, "np": a.np, "hosts": a.hosts,
                       "rate": a.rate if a.hosts > 1 else None, "rows": rows, "spearman": rho,
                       "memory_error": mem_err,
                       "pick_vs_fastest": chosen["step_s"] / fastest["step_s"] if chosen else None,
                       "plan": {k: v for k, v in got.items() if k != "ranked"}}, f, indent=1)


if __name__ == "__main__":
    main()
