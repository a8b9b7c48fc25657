"""The emulated hosts themselves: placement, real link traffic and rate, horovodrun without sshd, cleanup."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from hvdhybrid.testing import netemu
from hvdhybrid.testing.netemu import EmulatedHosts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MPIRUN = ["mpirun", "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]
MB16 = 16 << 20

NAMES = r"""
import json, socket
from mpi4py import MPI
c = MPI.COMM_WORLD
names = c.gather((c.rank, MPI.Get_processor_name(), socket.gethostname()), root=0)
if c.rank == 0:
    print("NAMES " + json.dumps(names), flush=True)
"""

SEND = r"""
import numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD
buf = np.zeros(%d, dtype=np.uint8)
c.Sendrecv(buf[:1], dest=1 - c.rank, recvbuf=buf[1:2], source=1 - c.rank)  # connect first
c.Barrier()
t0 = MPI.Wtime()
if c.rank == 0:
    c.Send(buf, dest=1)
    c.Recv(buf[:1], source=1)
    print("SECONDS %%.6f" %% (MPI.Wtime() - t0), flush=True)
else:
    c.Recv(buf, source=0)
    c.Send(buf[:1], dest=0)
""" % MB16

HVD = r"""
import socket
import torch
import horovod.torch as hvd
hvd.init()
s = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum)
names = hvd.allgather_object(socket.gethostname())
if hvd.rank() == 0:
    print("HVD %d %s %s" % (hvd.size(), s.item(), ",".join(names)), flush=True)
hvd.shutdown()
"""

RULES = r"""
import json, os
import hvdhybrid  # before MPI starts, as in every hvdhybrid program
from mpi4py import MPI
c = MPI.COMM_WORLD
got = c.gather(os.environ.get("OMPI_MCA_coll_tuned_dynamic_rules_filename", ""), root=0)
if c.rank == 0:
    print("RULES " + json.dumps(got), flush=True)
"""


def _tagged(out: str, tag: str) -> str:
    """The rest of the line that starts with ``tag``.

    horovodrun prefixes lines with ``[job,rank]<stdout>:``, and another rank's prefix may land at the
    end of this line before its newline (seen 1 run in 3); such a fragment is cut off.
    """
    for line in out.splitlines():
        i = line.find(tag + " ")
        if i >= 0:
            return re.sub(r"\[\d+,\d+\]<std(out|err)>:.*$", "", line[i + len(tag) + 1:]).strip()
    raise AssertionError(f"no {tag!r} line in output:\n{out}")


def _run(hosts: EmulatedHosts, cmd: list[str], env: dict[str, str], timeout: float) -> str:
    p = hosts.run(cmd, timeout=timeout, env=env, cwd=ROOT)
    assert p.returncode == 0, f"{' '.join(cmd[:6])}... exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_ranks_fill_hosts_by_slot(hosts2: EmulatedHosts, env2: dict[str, str]) -> None:
    cmd = MPIRUN + ["-np", "4", "--hostfile", hosts2.hostfile(), sys.executable, "-c", NAMES]
    names = json.loads(_tagged(_run(hosts2, cmd, env2, timeout=60), "NAMES"))
    assert names == [[0, "h0", "h0"], [1, "h0", "h0"], [2, "h1", "h1"], [3, "h1", "h1"]]


def test_all_reduce_rules_only_with_a_host_per_rank(hosts2: EmulatedHosts, env2: dict[str, str]) -> None:
    """Every rank of a job with a host per rank gives MPI hvdhybrid's all-reduce rules; no rank of a job
    whose ranks share hosts (or one host) does."""
    from hvdhybrid.comm.mpi_env import RULES_FILE

    own = MPIRUN + ["-np", "2", "--map-by", "node", "--hostfile", hosts2.hostfile(),
                    sys.executable, "-c", RULES]
    assert json.loads(_tagged(_run(hosts2, own, env2, timeout=60), "RULES")) == [RULES_FILE] * 2
    shared = MPIRUN + ["-np", "3", "--hostfile", hosts2.hostfile(), sys.executable, "-c", RULES]
    assert json.loads(_tagged(_run(hosts2, shared, env2, timeout=60), "RULES")) == [""] * 3
    one = MPIRUN + ["-np", "2", "-H", "h0:2", sys.executable, "-c", RULES]
    assert json.loads(_tagged(_run(hosts2, one, env2, timeout=60), "RULES")) == ["", ""]


def test_traffic_crosses_the_rate_limited_link(hosts2: EmulatedHosts, env2: dict[str, str]) -> None:
    rx0, _ = hosts2.link_bytes("h1")
    _, tx0 = hosts2.link_bytes("h0")
    cmd = MPIRUN + ["-np", "2", "-H", "h0:1,h1:1", sys.executable, "-c", SEND]
    seconds = float(_tagged(_run(hosts2, cmd, env2, timeout=60), "SECONDS"))
    rx1, _ = hosts2.link_bytes("h1")
    _, tx1 = hosts2.link_bytes("h0")
    print(f"16 MiB h0 -> h1 in {seconds * 1e3:.0f} ms: {MB16 * 8 / seconds / 1e9:.2f} Gbit/s "
          f"(h1 rx +{rx1 - rx0} B, h0 tx +{tx1 - tx0} B)")
    assert rx1 - rx0 >= MB16 and tx1 - tx0 >= MB16
    assert seconds >= 0.09, f"16 MiB took {seconds:.3f} s, faster than a 1 Gbit/s link allows"


def test_horovodrun_without_sshd(hosts2: EmulatedHosts, env2: dict[str, str]) -> None:
    cmd = ["horovodrun", "-np", "4", "-H", "h0:2,h1:2", sys.executable, "-c", HVD]
    size, total, names = _tagged(_run(hosts2, cmd, env2, timeout=120), "HVD").split()
    assert (int(size), float(total), names) == (4, 10.0, "h0,h0,h1,h1")


def _netns() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout


def test_exit_removes_everything(emulation: None) -> None:
    with EmulatedHosts(2, slots=1, rate=None) as hosts:
        tag, tmp = hosts.tag, hosts.tmpdir
        sleeps = [hosts.popen(["sleep", "300"]), hosts.popen(["sleep", "300"], host="h0"),
                  hosts.popen(["ssh", "-o", "BatchMode=yes", "h1", "sleep 300"], env=hosts.env())]
        victim = hosts.popen(["sleep", "300"], host="h1")
        pids = {h: hosts.pids(h) for h in (*hosts.hosts, hosts.launcher)}
        assert all(pids.values()), pids
        assert f"netemu-{tag}-h0" in _netns()
        assert hosts.kill_host("h1") >= 2
        assert victim.wait(timeout=10) == -9 and not hosts.pids("h1")
    hosts.close()  # idempotent
    assert f"netemu-{tag}-" not in _netns()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=30).stdout
    assert tag not in links
    assert not os.path.exists(tmp)
    assert all(p.poll() is not None for p in sleeps)
    alive = [pid for ps in pids.values() for pid in ps if netemu._alive(pid)]
    assert not alive, f"processes left running: {alive}"


def test_unavailable_names_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    why = netemu.unavailable()
    assert why is not None and "root" in why and "\n" not in why
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "tc" else "/bin/true")
    why = netemu.unavailable()
    assert why is not None and "tc" in why and "\n" not in why
