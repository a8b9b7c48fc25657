"""`hvdtrain launch`: build the mpirun/horovodrun command, supervise it, name a rank that died."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .. import waits
from ..waits import HANG_DIR_ENV

__all__ = ["Supervision", "Watcher", "launch_command", "supervise", "explain_failure",
           "print_hang_report"]

LAYOUT_FILE_ENV = "HVDHYBRID_LAYOUT_FILE"


def launch_command(np_: int, hostfile: Optional[str], use_horovodrun: bool,
                   args: list[str], map_by: str = "slot") -> list[str]:
    """The mpirun/horovodrun command line for ``hvdtrain ARGS`` on ``np_`` ranks (``map_by``:
    mpirun's ``--map-by``, ranks onto hosts; see :func:`hvdhybrid.layout.hostfile.place_ranks`)."""
    entry = [sys.executable, "-m", "hvdhybrid"]
    root = os.geteuid() == 0
    mpi_args = ["--oversubscribe"] + (["--allow-run-as-root"] if root else [])
    if map_by != "slot":
        mpi_args += ["--map-by", map_by]
    if use_horovodrun:
        hr = shutil.which("horovodrun") or "horovodrun"
        cmd = [hr, "-np", str(np_), "--mpi", "--mpi-args", " ".join(mpi_args)]
        cmd += ["-hostfile", hostfile] if hostfile else ["-H", f"localhost:{np_}"]
        return cmd + entry + args
    cmd = ["mpirun", "-np", str(np_)] + mpi_args
    for var in ("PATH", "PYTHONPATH", LAYOUT_FILE_ENV, HANG_DIR_ENV):
        cmd += ["-x", var]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    return cmd + entry + args


_PATTERNS = [
    re.compile(r"process rank (\d+) with PID \d+ on node \S+ exited on signal (\d+) \(([^)]*)\)"),
    re.compile(r"MPI_ABORT was invoked on rank (\d+)"),
    re.compile(r"Process name: \[\[\d+,\d+\],(\d+)\]"),
]


def explain_failure(log: str, layout: dict[str, str]) -> Optional[str]:
    """One line naming the rank (with its bundle and stage) that ended the job, if the log says."""
    for pat in _PATTERNS:
        m = pat.search(log)
        if m:
            rank = m.group(1)
            where = layout.get(rank, f"rank {rank}")
            if pat is _PATTERNS[0]:
                return f"{where} was killed by signal {m.group(2)} ({m.group(3)}); every rank was stopped"
            if pat is _PATTERNS[1]:
                return f"{where} failed (see its message above); every rank was stopped"
            return f"{where} exited with an error (see above); every rank was stopped"
    return None


def _die_with_parent() -> None:
    """In the child: get SIGTERM if this launcher dies, so no job outlives it (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def print_hang_report(hang_dir: str, ranks: int, timeout: float, when: str) -> None:
    """The lines the ranks wrote of what each waits for (see :mod:`hvdhybrid.waits`), together."""
    lines = waits.collect(hang_dir, ranks, timeout)
    if lines:
        sys.stderr.write(f"hvdtrain: what each rank was waiting for {when}:\n"
                         + "".join(f"  {x}\n" for x in lines))
        sys.stderr.flush()


@dataclass
class Supervision:
    """How a supervised job ended: its exit code, the last lines of its stderr, whether a person
    stopped it (SIGTERM/SIGINT to the launcher) or the watcher did (to grow), and why it failed."""

    rc: int
    tail: list[str] = field(default_factory=list)
    user_stop: bool = False
    grow: bool = False
    why: Optional[str] = None


Watcher = Callable[[Any, threading.Event, threading.Event], bool]
"""``watch(proc, asked, done)``: runs beside the job until ``done`` is set; returning True (after
setting ``asked``) stops the job gently, as a first SIGTERM would."""


def supervise(cmd: list[str], ranks: int = 0, watch: Optional[Watcher] = None) -> Supervision:
    """Run ``cmd``, pass its output through, stop it gently on SIGTERM/SIGINT, explain a failure.

    SIGUSR2 asks every rank what it waits for and prints the lines together (so does a failure,
    with the lines the ranks wrote when a ``--timeout`` fired). ``ranks``: how many lines to expect.
    ``watch``: see :data:`Watcher` (``hvdtrain launch --elastic`` grows a job this way).
    """
    fd, layout_path = tempfile.mkstemp(prefix="hvdhybrid-layout-", suffix=".json")
    os.close(fd)
    hang_dir = tempfile.mkdtemp(prefix="hvdhybrid-hang-")
    env = dict(os.environ, **{LAYOUT_FILE_ENV: layout_path, HANG_DIR_ENV: hang_dir})
    # its own session: a Ctrl-C in the terminal reaches this launcher, not mpirun directly
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1,
                            start_new_session=True, preexec_fn=_die_with_parent)
    graceful = os.path.basename(cmd[0]) == "mpirun"
    tail: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line)
            del tail[:-400]

    t = threading.Thread(target=pump, daemon=True)
    t.start()

    asked: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        # First SIGTERM/SIGINT: SIGUSR1, which mpirun forwards to every rank; each
        # finishes its step, all write a checkpoint, and they exit. SIGTERM to mpirun
        # itself would make it stop relaying output and kill the ranks a second later.
        # A second signal (or horovodrun, which SIGUSR1 would kill): pass it on as is.
        if graceful and not asked:
            sys.stderr.write("hvdtrain: stopping after the current step (checkpoint first); "
                             "signal again to stop at once\n")
            proc.send_signal(signal.SIGUSR1)
        else:
            proc.send_signal(signum)
        asked.append(signum)

    def hang_report(signum: int, frame: Any) -> None:
        waits.trigger(hang_dir)  # each rank's reporter thread answers within a fraction of a second
        threading.Thread(target=print_hang_report, args=(hang_dir, ranks, waits.GATHER_S, "now"),
                         daemon=True).start()

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    old[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, hang_report)
    grow, done, stopping = [False], threading.Event(), threading.Event()
    if watch is not None:
        def watcher() -> None:
            if watch(proc, stopping, done) and proc.poll() is None and graceful:
                grow[0] = True
                proc.send_signal(signal.SIGUSR1)  # every rank finishes its step and checkpoints
        threading.Thread(target=watcher, daemon=True).start()
    try:
        rc = proc.wait()
        done.set()
        t.join(timeout=5)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    try:
        with open(layout_path) as f:
            layout = json.load(f)
    except (OSError, ValueError):
        layout = {}
    finally:
        os.unlink(layout_path)
    why = None
    if rc not in (0, 2):
        print_hang_report(hang_dir, ranks, 0.0, "when the job ended")
        why = explain_failure("".join(tail), layout)
        if why:
            sys.stderr.write(f"hvdtrain: {why}\n")
    shutil.rmtree(hang_dir, ignore_errors=True)
    return Supervision(rc, tail, bool(asked), grow[0] and not asked, why)
