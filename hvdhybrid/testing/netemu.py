"""Emulated hosts on one machine, for multi-host tests without ssh or a cluster.

(A test harness, over 350 lines for one concept: the namespaces, links, names
and rsh agent of one emulation are set up and torn down together.)

Each emulated host ``h0``, ``h1``, ... is a network namespace with one veth link
(named :data:`IFACE` in every host) into a bridge that lives in a private
"switch" namespace; one more namespace on the bridge, ``launcher``, is where
``mpirun`` / ``horovodrun`` run. Every command run on an emulated host gets its
own hostname and a private ``/etc/hosts`` (``unshare --uts --mount``, a bind
mount); nothing in the machine's own namespace, hostname or ``/etc`` changes.

Open MPI and horovodrun start remote processes through a small agent script
that takes ssh's arguments (``[options] HOST CMD...``) and runs ``CMD`` inside
the namespace of ``HOST``; :meth:`EmulatedHosts.env` points Open MPI at it and
puts it on ``PATH`` as ``ssh``. Links can be limited with ``tc tbf`` in both
directions (tbf, 128 KiB burst). Latency cannot be emulated (no netem), and all hosts share the
machine's cores unless ``cpus`` gives each its own (``taskset``).

Example::

    with EmulatedHosts(2, slots=2, rate="1gbit") as hosts:
        p = hosts.run(["mpirun", "-np", "4", "--hostfile", hosts.hostfile(), "hostname"], timeout=60)
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

__all__ = ["IFACE", "EmulationError", "EmulatedHosts", "unavailable"]

IFACE = "emu0"  # the link's name inside every emulated host (a common name, as horovodrun's NIC check wants)
_NS_PREFIX = "netemu-"
_BURST = "128kb"  # tbf bucket: 64kb reached 0.8 of 1 Gbit/s with veth's 64 KiB segments, 128kb 0.94-0.96
_TOOLS = ("ip", "tc", "unshare", "hostname", "mount")
_counter = itertools.count()

# Runs argv ("$@" after the name and hosts file) with its own hostname and /etc/hosts.
_SETUP = 'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"'

_AGENT = r"""#!/bin/sh
# netemu agent for emulated hosts {tag}: takes ssh's arguments, [options] HOST [options] CMD...,
# and runs CMD (its words joined, as ssh does) with sh -c in the namespace of HOST.
host=
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; if [ -z "$host" ]; then host=${{1#*@}}; shift; fi; break ;;
    -[BbcDEeFIiJLlmOopQRSWw]) shift 2 || exit 255 ;;
    -*) shift ;;
    *) if [ -z "$host" ]; then host=${{1#*@}}; shift; else break; fi ;;
  esac
done
case "$host" in
{cases}
  *) echo "netemu: unknown emulated host '$host' (known: {known}); use one of those names" >&2; exit 255 ;;
esac
if [ $# -eq 0 ]; then
  echo "netemu: no command for $host (interactive logins are not supported); pass a command" >&2
  exit 255
fi
exec ${{cpus:+taskset -c $cpus}} ip netns exec "$ns" unshare --uts --mount sh -c \
  'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec sh -c "$*"' "$name" {hosts_file} "$@"
"""


class EmulationError(RuntimeError):
    """Emulated hosts could not be set up or used; the message says what failed and how to fix it."""


def _tool_output(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def unavailable() -> Optional[str]:
    """None if this machine can emulate hosts; else one line saying why not."""
    if os.geteuid() != 0:
        return "emulated hosts need root (network namespaces, tc); run the tests as root"
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        return f"emulated hosts need {', '.join(missing)} on PATH; install iproute2 and util-linux"
    probe = f"{_NS_PREFIX}probe-{os.getpid()}-{next(_counter)}"
    try:
        p = _tool_output(["ip", "netns", "add", probe])
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns add` could not run ({e}); emulated hosts need network namespaces"
    if p.returncode != 0:
        return f"`ip netns add` was refused ({_last_line(p.stderr)}); emulated hosts need network namespaces"
    _tool_output(["ip", "netns", "del", probe])
    return None


def _existing_namespaces() -> set[str]:
    out = _tool_output(["ip", "netns", "list"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _new_tag(given: Optional[str]) -> str:
    """A short tag, unique among this machine's namespaces: 6 hex digits from pid and a counter."""
    existing = _existing_namespaces()
    if given is not None:
        if not re.fullmatch(r"[a-z0-9]{1,6}", given):
            raise EmulationError(f"tag {given!r} is not 1-6 lowercase letters or digits; pick such a tag")
        if any(ns.startswith(f"{_NS_PREFIX}{given}-") for ns in existing):
            raise EmulationError(f"namespaces with tag {given!r} already exist; pick another tag "
                                 f"or delete them (ip netns del)")
        return given
    while True:
        tag = f"{(os.getpid() * 256 + next(_counter)) % 16**6:06x}"
        if not any(ns.startswith(f"{_NS_PREFIX}{tag}-") for ns in existing):
            return tag


def _pick_subnet(tag: str) -> str:
    """``10.77.K`` with K from the tag, skipping any the machine's own namespace already uses."""
    used = _tool_output(["ip", "-4", "-o", "addr"]).stdout
    start = int(tag, 36) % 250
    for i in range(250):
        prefix = f"10.77.{(start + i) % 250 + 1}"
        if f" {prefix}." not in used:
            return prefix
    raise EmulationError("no free 10.77.K.0/24 subnet; remove addresses in 10.77.0.0/16 from this machine")


class EmulatedHosts:
    """``n`` emulated hosts ``h0..h{n-1}`` with ``slots`` slots each and links limited to ``rate``."""

    def __init__(self, n: int, slots: int = 2, rate: Optional[str] = "1gbit", tag: Optional[str] = None,
                 cpus: Optional[list[str]] = None):
        """``cpus``: the cores each host's processes may run on (``taskset -c`` lists, host ``i`` gets
        ``cpus[i % len(cpus)]``; the launcher host 0's), so hosts do not share cores; None: all share
        the machine's."""
        if not 1 <= n <= 200:
            raise EmulationError(f"n={n} emulated hosts is out of range; use 1 to 200")
        if slots < 1:
            raise EmulationError(f"slots={slots} must be at least 1")
        why = unavailable()
        if why:
            raise EmulationError(why)
        self.n, self.slots, self.rate = n, slots, rate
        self.cpus: dict[str, str] = {}
        if cpus:
            self.cpus = {f"h{k}": cpus[k % len(cpus)] for k in range(n)}
            self.cpus["launcher"] = cpus[0]
        self.tag = _new_tag(tag)
        self.subnet = _pick_subnet(self.tag)
        self.hosts: list[str] = [f"h{i}" for i in range(n)]
        self.launcher = "launcher"
        self._addr = {h: f"{self.subnet}.{i + 2}" for i, h in enumerate(self.hosts)}
        self._addr[self.launcher] = f"{self.subnet}.1"
        self._ns = {h: f"{_NS_PREFIX}{self.tag}-{h}" for h in [*self.hosts, self.launcher]}
        self._switch = f"{_NS_PREFIX}{self.tag}-switch"
        self._created: list[str] = []  # namespaces this instance added, in order
        self._children: list[subprocess.Popen[Any]] = []
        self._closed = False
        self.tmpdir = tempfile.mkdtemp(prefix=f"netemu-{self.tag}-")
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ---- setup -------------------------------------------------------------------------------------

    def _ip(self, *args: str) -> None:
        p = _tool_output(list(args))
        if p.returncode != 0:
            raise EmulationError(f"`{shlex.join(args)}` failed: {_last_line(p.stderr)}; "
                                 f"check that this machine allows network namespaces and veth links")

    def _add_ns(self, ns: str) -> None:
        self._ip("ip", "netns", "add", ns)
        self._created.append(ns)

    def _build(self) -> None:
        """Create the switch, one namespace and link per host, the hosts file and the agent."""
        bridge = f"ne{self.tag}br"
        self._add_ns(self._switch)
        self._ip("ip", "-n", self._switch, "link", "add", bridge, "type", "bridge")
        self._ip("ip", "-n", self._switch, "link", "set", bridge, "up")
        for i, host in enumerate([*self.hosts, self.launcher]):
            port = f"ne{self.tag}{'l' if host == self.launcher else f'h{i}'}"
            self._add_host(host, port, bridge)
        self._write_files()

    def _add_host(self, host: str, port: str, bridge: str) -> None:
        ns, sw = self._ns[host], self._switch
        self._add_ns(ns)
        self._ip("ip", "link", "add", IFACE, "netns", ns, "type", "veth", "peer", "name", port, "netns", sw)
        self._ip("ip", "-n", sw, "link", "set", port, "master", bridge)
        self._ip("ip", "-n", sw, "link", "set", port, "up")
        self._ip("ip", "-n", ns, "addr", "add", f"{self._addr[host]}/24", "dev", IFACE)
        self._ip("ip", "-n", ns, "link", "set", IFACE, "up")
        self._ip("ip", "-n", ns, "link", "set", "lo", "up")
        if self.rate is not None and host != self.launcher:
            for where, dev in ((ns, IFACE), (sw, port)):  # host's send, host's receive
                self._ip("tc", "-n", where, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                         "burst", _BURST, "latency", "50ms")

    def _write_files(self) -> None:
        names = [*self.hosts, self.launcher]
        self._hosts_file = os.path.join(self.tmpdir, "hosts")
        with open(self._hosts_file, "w") as f:
            f.write("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
            f.writelines(f"{self._addr[h]} {h}\n" for h in names)
        with open(os.path.join(self.tmpdir, "hostfile"), "w") as f:
            f.writelines(f"{h} slots={self.slots}\n" for h in self.hosts)
        bindir = os.path.join(self.tmpdir, "bin")
        os.mkdir(bindir)
        self.agent = os.path.join(bindir, "netemu-agent")
        cases = "\n".join(f"  {h}|{self._addr[h]}) ns={self._ns[h]} name={h} cpus={self.cpus.get(h, '')} ;;"
                          for h in names)
        with open(self.agent, "w") as f:
            f.write(_AGENT.format(tag=self.tag, cases=cases, known=" ".join(names),
                                  hosts_file=shlex.quote(self._hosts_file)))
        os.chmod(self.agent, 0o755)
        os.symlink(self.agent, os.path.join(bindir, "ssh"))

    # ---- use ---------------------------------------------------------------------------------------

    def __enter__(self) -> EmulatedHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_host(self, host: str) -> None:
        if host not in self._ns:
            raise EmulationError(f"unknown emulated host {host!r}; use one of {', '.join(self._ns)}")
        if self._closed:
            raise EmulationError("these emulated hosts are closed; create a new EmulatedHosts")

    def address(self, host: str) -> str:
        """The IPv4 address of ``host`` (or ``launcher``) on the emulated network."""
        self._check_host(host)
        return self._addr[host]

    def hostfile(self) -> str:
        """Path of a hostfile listing every emulated host with its slots."""
        return os.path.join(self.tmpdir, "hostfile")

    def env(self, base: Optional[dict[str, str]] = None) -> dict[str, str]:
        """Environment for mpirun / horovodrun on the emulated hosts (``base`` defaults to os.environ)."""
        e = dict(os.environ if base is None else base)
        subnet = f"{self.subnet}.0/24"
        e.update({
            "OMPI_MCA_plm_rsh_agent": self.agent,
            "OMPI_MCA_plm_rsh_no_tree_spawn": "1",
            "OMPI_MCA_oob_tcp_if_include": subnet,
            "OMPI_MCA_btl_tcp_if_include": subnet,
            "OMPI_MCA_btl": "tcp,self,vader",
            "OMPI_MCA_btl_tcp_links": "2",
            "OMPI_MCA_mpi_yield_when_idle": "1",
            "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        })
        if self.cpus:  # Open MPI's own binding (to a socket past 2 ranks) would undo each host's cores
            e["OMPI_MCA_hwloc_base_binding_policy"] = "none"
        path = [os.path.dirname(self.agent), os.path.dirname(sys.executable), e.get("PATH", "")]
        e["PATH"] = os.pathsep.join(p for p in path if p)
        return e

    def argv_on(self, host: str, cmd: list[str]) -> list[str]:
        """The argv that runs ``cmd`` on ``host`` (or ``launcher``), with its hostname and hosts file."""
        self._check_host(host)
        pin = ["taskset", "-c", self.cpus[host]] if host in self.cpus else []
        return [*pin, "ip", "netns", "exec", self._ns[host], "unshare", "--uts", "--mount",
                "sh", "-c", _SETUP, host, self._hosts_file, *cmd]

    def popen(self, cmd: list[str], env: Optional[dict[str, str]] = None, cwd: Optional[str] = None,
              host: Optional[str] = None, **kw: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` on the launch node (or ``host``) in a new session; :meth:`env` by default."""
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self.argv_on(host or self.launcher, cmd), env=self.env() if env is None else env,
                             cwd=cwd, **kw)
        self._children.append(p)
        return p

    def run(self, cmd: list[str], timeout: float, env: Optional[dict[str, str]] = None,
            cwd: Optional[str] = None, host: Optional[str] = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` on the launch node (or ``host``) and capture its text output.

        On timeout (or an interrupt) the command's process group gets SIGTERM, then SIGKILL;
        a timeout raises ``subprocess.TimeoutExpired`` with the output so far."""
        p = self.popen(cmd, env=env, cwd=cwd, host=host, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = _stop_group(p)
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
        except BaseException:  # e.g. KeyboardInterrupt: leave nothing running
            _stop_group(p)
            raise
        return subprocess.CompletedProcess(cmd, p.returncode, out, err)

    def link_bytes(self, host: str) -> tuple[int, int]:
        """(rx, tx) byte counters of ``host``'s link, as seen inside the host."""
        self._check_host(host)
        p = _tool_output(["ip", "-j", "-s", "-n", self._ns[host], "link", "show", "dev", IFACE])
        if p.returncode != 0:
            raise EmulationError(f"cannot read the link counters of {host}: {_last_line(p.stderr)}")
        stats = json.loads(p.stdout)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    def pids(self, host: str) -> list[int]:
        """Ids of the processes running on ``host`` (or ``launcher``)."""
        self._check_host(host)
        return _ns_pids(self._ns[host])

    def kill_host(self, host: str) -> int:
        """SIGKILL every process on ``host`` (a crashed machine); returns how many were killed."""
        self._check_host(host)
        return _kill_ns(self._ns[host])

    # ---- cleanup -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process in this instance's namespaces, delete them and the temp dir (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for ns in reversed(self._created):
            _kill_ns(ns)
        for p in self._children:
            _reap(p)
        for ns in reversed(self._created):
            _tool_output(["ip", "netns", "del", ns])
        self._created.clear()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        atexit.unregister(self.close)


def _ns_pids(ns: str) -> list[int]:
    p = _tool_output(["ip", "netns", "pids", ns])
    return [int(w) for w in p.stdout.split() if w.isdigit() and int(w) != os.getpid()]


def _kill_ns(ns: str) -> int:
    """SIGKILL the processes in namespace ``ns`` until none is left (they may fork meanwhile)."""
    killed: set[int] = set()
    for _ in range(20):
        pids = [p for p in _ns_pids(ns) if p not in killed or _alive(p)]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return len(killed)


def _alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _reap(p: subprocess.Popen[Any]) -> None:
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=5)


def _stop_group(p: subprocess.Popen[Any]) -> tuple[str, str]:
    """SIGTERM the process group of ``p``, SIGKILL it after 3 s; the output it wrote."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            out, err = p.communicate(timeout=grace)
            return out or "", err or ""
        except subprocess.TimeoutExpired:
            continue
    return "", ""
