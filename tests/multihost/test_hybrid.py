"""A hybrid job across 2 emulated hosts x 2 ranks (2 bundles x 2 stages): launched from a hostfile and
with ``horovodrun -H``, it ends with the parameters of the same job on one host; a host's ranks
killed mid-run end the whole job within 30 s, with the host named."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest
import torch

from hvdhybrid.testing.netemu import EmulatedHosts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MPIRUN = ["mpirun", "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]
JOB = [sys.executable, "-m", "hvdhybrid", "mlp", "--stages", "2", "--steps", "4", "--batch-size", "32",
       "--microbatches", "2", "--no-progress", "--no-fp16-compression", "--save-params", "--seed", "5"]


def _params(out: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(out, "params.pt"))


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.fixture(scope="module")
def one_host(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The same job on this machine alone (4 ranks, shared memory)."""
    out = str(tmp_path_factory.mktemp("onehost") / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    p = subprocess.run(MPIRUN + ["-np", "4", "--oversubscribe"] + JOB + ["--out", out], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return _params(out)


def test_hostfile_launch_across_hosts_equals_one_host(hosts2: EmulatedHosts, env2: dict[str, str],
                                                      one_host: dict[str, torch.Tensor],
                                                      tmp_path: Any) -> None:
    out = str(tmp_path / "run")
    rx0 = hosts2.link_bytes("h1")[0]
    p = hosts2.run(MPIRUN + ["-np", "4", "--hostfile", hosts2.hostfile()] + JOB + ["--out", out],
                   timeout=240, env=env2, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _diff(_params(out), one_host) <= 1e-5
    assert hosts2.link_bytes("h1")[0] > rx0  # the gradients did cross the link


def test_horovodrun_across_hosts_equals_one_host(hosts2: EmulatedHosts, env2: dict[str, str],
                                                 one_host: dict[str, torch.Tensor], tmp_path: Any) -> None:
    out = str(tmp_path / "run")
    hr = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    p = hosts2.run([hr, "-np", "4", "-H", "h0:2,h1:2", "--mpi"] + JOB + ["--out", out],
                   timeout=240, env=env2, cwd=ROOT)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    assert _diff(_params(out), one_host) <= 1e-5


def test_a_killed_host_ends_the_job_within_30_s_naming_it(hosts2: EmulatedHosts, env2: dict[str, str],
                                                          tmp_path: Any) -> None:
    out = str(tmp_path / "run")
    job = [a if a != "4" else "100000" for a in JOB]  # --steps: runs until killed
    proc = hosts2.popen(MPIRUN + ["-np", "4", "--hostfile", hosts2.hostfile()] + job + ["--out", out],
                        env=env2, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(out, "metrics.jsonl")):  # training has started
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not start"
            time.sleep(0.5)
        time.sleep(2)
        assert hosts2.kill_host("h1") > 0
        t0 = time.monotonic()
        text, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"job ended {took:.1f} s after h1 was killed:\n" + "\n".join(text.splitlines()[-12:]))
    assert proc.returncode != 0
    assert took <= 30
    assert "Peer host:  h1" in text or "node h1" in text, text[-3000:]
    # mpirun may return while the surviving host's ranks are still being ended: give them the rest of
    # the 30 s, then none may be left
    while hosts2.pids("h0") and time.monotonic() - t0 < 30:
        time.sleep(0.2)
    print(f"h0's ranks gone {time.monotonic() - t0:.1f} s after h1 was killed")
    assert not hosts2.pids("h0"), "ranks on the surviving host are still running 30 s after the kill"
