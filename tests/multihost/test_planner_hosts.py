"""The planner across 2 emulated hosts x 2 ranks (1 Gbit/s): ``plan --auto --hostfile`` measures the link
between the hosts and weighs both ``--map-by`` values; ``--layout auto`` across the hosts plans on the
job's own ranks and ends with one process's parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import torch

from hvdhybrid.testing.netemu import EmulatedHosts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MPIRUN = ["mpirun", "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]
HVD = [sys.executable, "-m", "hvdhybrid"]
MLP = ["mlp", "--hidden", "128", "--depth", "4", "--steps", "3", "--batch-size", "32", "--no-progress",
       "--no-fp16-compression", "--save-params", "--seed", "5"]


def _params(out: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(out, "params.pt"))


def test_plan_auto_across_hosts_measures_the_link_and_weighs_map_by(hosts2: EmulatedHosts,
                                                                    env2: dict[str, str]) -> None:
    cmd = [*HVD, "plan", "-np", "4", "--auto", "--hostfile", hosts2.hostfile(), "--top", "1000"]
    p = hosts2.run([*cmd, "--json", *MLP[:7]], timeout=300, env=env2, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout[p.stdout.index("{"):])
    assert 0.5e8 < got["remote"]["bandwidth"] < 1.6e8, got["remote"]  # 1 Gbit/s is 1.25e8 bytes/s
    assert got["link"]["bandwidth"] > 5 * got["remote"]["bandwidth"]  # inside a host: shared memory
    ranked = got["ranked"]
    assert {r["map_by"] for r in ranked} == {"slot", "node"}
    both = {}
    for r in ranked:
        both.setdefault(tuple(r["options"]), {})[r["map_by"]] = r
    pipe = both[("--tensor", "1", "--stages", "2", "--schedule", "1f1b", "--microbatches", "1", "--zero", "0",
                 "--recompute", "none")]
    crossing = {m: sum(v for a, b, v in pipe[m]["links"] if a != b) for m in pipe}
    assert crossing["slot"] > 0 and crossing["node"] > 0  # gradients cross with slot, activations with node
    text = hosts2.run([*cmd, *MLP[:7]], timeout=300, env=env2, cwd=ROOT)
    assert text.returncode == 0, text.stderr[-3000:]
    assert "between hosts" in text.stdout and "(launch with --map-by" in text.stdout
    assert "h0 <-> h1:" in text.stdout


def test_layout_auto_across_hosts_trains_as_one_process(hosts2: EmulatedHosts, env2: dict[str, str],
                                                        tmp_path: Any) -> None:
    one = str(tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.run([*HVD, *MLP, "--out", one], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    out = str(tmp_path / "auto")
    p = hosts2.run(MPIRUN + ["-np", "4", "--hostfile", hosts2.hostfile(), *HVD, *MLP, "--layout", "auto",
                             "--out", out], timeout=300, env=env2, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    plan = json.load(open(os.path.join(out, "plan.json")))
    assert plan["remote"] is not None and plan["ranks_per_host"] >= 1
    a, b = _params(out), _params(one)
    assert set(a) == set(b) and max(float((a[n] - b[n]).abs().max()) for n in a) <= 1e-5
