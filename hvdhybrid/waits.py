"""What this rank is doing and waiting for, said in one line when a job looks stuck.

The executor names the action it runs (``1B3.2``), and every wait with a deadline names what it
waits for (a callable, evaluated only when a report is made: nothing is formatted in the hot
path). A *report* is one line per rank::

    rank 0 | bundle 0 | stage 0 (host h0): in 0B0, waiting for gradients of microbatch 0 from
    stage 1 to stage 0 from rank 1 | bundle 0 | stage 1

It is made on SIGUSR2 (mpirun forwards it to every rank; ``hvdtrain launch`` passes it on), and
when ``--timeout`` fires in a wait: the rank that timed out asks every rank for its line through
a *trigger* file in the hang directory, waits up to :data:`GATHER_S` for them, and only then
ends the job. Each rank writes its line to ``<hang dir>/rank-NNNNN.txt`` and to its stderr;
``hvdtrain launch`` (or, without it, the rank that timed out) prints them together.

The hang directory is ``HVDHYBRID_HANG_DIR`` (the launcher sets it) or the run's ``OUT/hang``.
The state is per process, like a logger's: one rank per process.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Union

__all__ = ["HANG_DIR_ENV", "Reporter", "collect", "freeze", "line", "set_action", "trigger", "waiting"]

HANG_DIR_ENV = "HVDHYBRID_HANG_DIR"
TRIGGER = "trigger"
POLL_S = 0.2
GATHER_S = 3.0

Wait = Union[str, Callable[[], str]]
_NOW: dict[str, Any] = {"me": f"pid {os.getpid()}", "action": None, "wait": None}


def set_action(action: Optional[object]) -> None:
    """The action this rank runs now (its ``str`` is taken only for a report); None: between actions."""
    _NOW["action"] = action


@contextmanager
def waiting(what: Wait) -> Iterator[None]:
    """Within: this rank waits for ``what`` (a text, or a callable that makes it)."""
    before = _NOW["wait"]
    _NOW["wait"] = what
    try:
        yield
    finally:
        _NOW["wait"] = before


def freeze() -> None:
    """Keep this moment's line as the report (a wait that timed out, before its exception unwinds)."""
    _NOW["frozen"] = line()


def line() -> str:
    """This rank's report: who it is, the action it is in, what it waits for."""
    if _NOW.get("frozen"):
        return str(_NOW["frozen"])
    action, wait = _NOW["action"], _NOW["wait"]
    where = f"in {action}" if action is not None else "between actions"
    try:
        what = wait() if callable(wait) else wait
    except Exception as e:  # a report must never fail
        what = f"(cannot say: {e})"
    return f"{_NOW['me']}: {where}, " + (f"waiting for {what}" if what else "computing (not waiting)")


def collect(hang_dir: str, ranks: int, timeout: float = GATHER_S) -> list[str]:
    """The lines of up to ``ranks`` ranks in ``hang_dir``, once all are there or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while True:
        names = sorted(n for n in _listdir(hang_dir) if n.startswith("rank-") and n.endswith(".txt"))
        if len(names) >= ranks or time.monotonic() > deadline:
            break
        time.sleep(POLL_S / 2)
    out = []
    for n in names:
        try:
            with open(os.path.join(hang_dir, n)) as f:
                out.append(f.read().strip())
        except OSError:
            continue
    return out


def trigger(hang_dir: str) -> None:
    """Ask every rank watching ``hang_dir`` for its line (each answers once per trigger); nothing
    when a report was asked for in the last few seconds (ranks that time out together ask once)."""
    os.makedirs(hang_dir, exist_ok=True)
    try:
        if time.time() - os.path.getmtime(os.path.join(hang_dir, TRIGGER)) < 3 * GATHER_S:
            return
    except OSError:
        pass
    for n in _listdir(hang_dir):  # the lines of an earlier report
        if n.startswith("rank-"):
            _remove(os.path.join(hang_dir, n))
    tmp = os.path.join(hang_dir, f".{TRIGGER}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(f"{time.time()}\n")
    os.replace(tmp, os.path.join(hang_dir, TRIGGER))


class Reporter:
    """This rank's reporting thread: a line on SIGUSR2, or on a new trigger file in ``hang_dir``.

    Args:
        me: this rank's tag (``rank 1 | bundle 0 | stage 1``).
        rank: its world rank (names its file).
        hang_dir: where lines go and triggers come from (None: SIGUSR2 only, lines to stderr).
    """

    def __init__(self, me: str, rank: int, hang_dir: Optional[str]) -> None:
        _NOW["me"] = f"{me} (host {socket.gethostname()})"
        self.rank, self.hang_dir = rank, hang_dir
        self._seen = self._trigger_stamp()
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._old: Any = None
        self._stop = False

    def start(self) -> Reporter:
        if threading.current_thread() is threading.main_thread():
            # the C-level handler writes the signal's number to the pipe even while the main thread
            # is inside MPI or a kernel; the Python-level handler has nothing to do
            self._old = signal.signal(signal.SIGUSR2, lambda *_: None)
            self._old_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._loop, daemon=True, name="hvdhybrid-hang-report").start()
        return self

    def close(self) -> None:
        self._stop = True
        if self._old is not None and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._old_fd)
            signal.signal(signal.SIGUSR2, self._old)
            self._old = None

    def report(self) -> None:
        """Write this rank's line now (to the hang directory and stderr)."""
        text = line()
        if self.hang_dir:
            try:
                os.makedirs(self.hang_dir, exist_ok=True)
                path = os.path.join(self.hang_dir, f"rank-{self.rank:05d}.txt")
                with open(path + ".tmp", "w") as f:
                    f.write(text + "\n")
                os.replace(path + ".tmp", path)
            except OSError:
                pass
        sys.stderr.write(f"[hang report] {text}\n")
        sys.stderr.flush()

    def _trigger_stamp(self) -> float:
        if not self.hang_dir:
            return 0.0
        try:
            return os.path.getmtime(os.path.join(self.hang_dir, TRIGGER))
        except OSError:
            return 0.0

    def _loop(self) -> None:
        import select

        while not self._stop:
            ready, _, _ = select.select([self._read], [], [], POLL_S)
            asked = False
            if ready:
                got = os.read(self._read, 64)
                asked = signal.SIGUSR2 in got
            stamp = self._trigger_stamp()
            if stamp > self._seen:
                self._seen, asked = stamp, True
            if asked:
                self.report()


def _listdir(d: str) -> list[str]:
    try:
        return os.listdir(d)
    except OSError:
        return []


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
