"""``hvdtrain launch --elastic``: when a host fails, go on with the hosts left; grow back when hosts return.

The loop, around one supervised mpirun job at a time:

1. find the usable hosts: the hostfile (read again each time) or the discovery command's
   ``host slots=N`` lines, less the hosts whose ranks died within ``--cooldown`` seconds;
2. pick the world: the largest that the job's own layout options fit in those slots
   (``hvdtrain plan --fit``: ``--stages``, ``--tensor``, ``--bundle-shape`` kept, bundles as many as
   fit, the global batch unchanged); when they fit none, the smallest change to them that fits
   (``--tensor`` or ``--stages`` lowered; ``--keep-layout``: stop instead), printed as ``hvdtrain plan``
   prints a layout, with the change;
3. launch it with ``--resume`` when the run has a complete checkpoint (resharded by name into the
   new layout: the run ends with the parameters it would have had without the failure);
4. while it runs, watch discovery: when more bundles would fit, stop the job gently (SIGUSR1: every
   rank finishes its step and writes a checkpoint) and go to 1;
5. when it fails, note the host it lost (from Open MPI's message), and go to 1; after
   ``--max-restarts`` failures, or a failure with no step won since the last, stop with the reason.

Every event (launch, failure, growth, the end) is a line on the console and a JSON line in the
run's ``metrics.jsonl`` (``{"event": ...}``; step lines have ``"step"`` instead).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..errors import InputError
from ..layout.hostfile import Host, parse_hostfile, place_ranks, read_hostfile
from ..layout.topology import Layout
from ..training.checkpoint import committed
from .launcher import Supervision, launch_command, supervise
from .layout_fit import apply_changes, describe_changes

__all__ = ["Elastic", "ElasticError", "ElasticOptions", "lost_hosts", "out_dir"]

STOPPED_EXIT = 143  # a job stopped gently (SIGUSR1 / SIGTERM) after its checkpoint
_LOST = [re.compile(r"on node (\S+) exited on signal"), re.compile(r"Peer host:\s+(\S+)"),
         re.compile(r"Remote daemon:\s+\S+ on node (\S+)"), re.compile(r"daemon on node (\S+)")]


class ElasticError(InputError):
    """An elastic launch that cannot start (no --out, no usable host, a discovery command that fails)."""


@dataclass(frozen=True)
class ElasticOptions:
    """What ``hvdtrain launch --elastic`` was given."""

    np_max: int
    args: list[str]  # the job: hvdtrain's model command and its options
    hostfile: Optional[str] = None
    discovery: Optional[str] = None  # a shell command printing 'host slots=N' lines
    map_by: str = "slot"
    max_restarts: int = 3
    cooldown: float = 300.0  # seconds a host whose ranks died is left out
    interval: float = 10.0  # seconds between discovery checks while a job runs
    keep_layout: bool = False  # stop rather than change --tensor/--stages when the rule fits no world


def out_dir(args: list[str]) -> Optional[str]:
    """The job's ``--out`` (``--out X`` or ``--out=X``), if given."""
    for i, a in enumerate(args):
        if a == "--out" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--out="):
            return a[len("--out="):]
    return None


def lost_hosts(log: str) -> set[str]:
    """The hosts Open MPI's messages say were lost (a rank killed there, its daemon gone)."""
    return {m.group(1) for pat in _LOST for m in pat.finditer(log)}


@dataclass
class Elastic:
    """One elastic launch. ``fit(args, slots) -> {"np", "widths", "tensor", "layout", "changes", ...}``
    picks the world (:func:`hvdhybrid.cli.layout_fit.fit_layout` in a subprocess by default)."""

    opts: ElasticOptions
    fit: Optional[Callable[[list[str], int], dict[str, Any]]] = None
    say: Callable[[str], None] = field(default=lambda text: print(f"hvdtrain: elastic: {text}",
                                                                   file=sys.stderr, flush=True))
    excluded: dict[str, float] = field(default_factory=dict)  # host -> until (time.monotonic)
    pending: list[str] = field(default_factory=list)  # event lines not yet in metrics.jsonl

    def __post_init__(self) -> None:
        out = out_dir(self.opts.args)
        if out is None:
            raise ElasticError("--elastic needs the job's --out DIR (its checkpoints are what a relaunch "
                               "resumes from); add --out DIR and --checkpoint-every N after the model")
        self.out = out
        self.created = not os.path.exists(out)  # a run this launch starts (it may start it over)
        keep = self.opts.keep_layout
        self.fit_world: Callable[[list[str], int], dict[str, Any]] = \
            self.fit or (lambda a, n: fit_in_subprocess(a, n, keep_layout=keep))

    # -- hosts ----------------------------------------------------------------------------------
    def discover(self) -> list[Host]:
        """Every host discovery lists now (the hostfile, read again, or the command's output)."""
        if self.opts.discovery is None:
            assert self.opts.hostfile is not None
            return read_hostfile(self.opts.hostfile)
        try:
            p = subprocess.run(self.opts.discovery, shell=True, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise ElasticError(f"the discovery command {self.opts.discovery!r} ran over 60 s") from None
        if p.returncode:
            said = p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else []
            raise ElasticError(f"the discovery command {self.opts.discovery!r} failed with exit code "
                               f"{p.returncode}{': ' + said[0][-300:] if said else ''}; it must print the "
                               "usable hosts as 'host slots=N' lines and exit 0")
        return parse_hostfile(p.stdout, "<discovery>")

    def usable(self) -> list[Host]:
        now = time.monotonic()
        return [h for h in self.discover() if self.excluded.get(h.name, 0.0) <= now]

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> int:
        """Launch, relaunch on failure, grow; returns the exit code of the last job (or 1 when it gave up)."""
        restarts = 0
        last_failed_at: Optional[int] = -2  # the checkpoint step at the last failure
        while True:
            hosts = self.usable()
            slots = min(self.opts.np_max, sum(h.slots for h in hosts))
            if slots < 1:
                self.say("no usable host left; stopping")
                self.event("stop", why="no usable host")
                return 1
            got = self.fit_world(self.opts.args, slots)
            resume = self.checkpoint_step()
            if resume is None and self.created and os.path.isdir(self.out):
                shutil.rmtree(self.out)  # failed before a first checkpoint: start over (this launch made it)
            self.announce(hosts, got, resume)
            ran = self.once(hosts, got, resume)
            if ran.rc == 0:
                self.event("done", np=got["np"], step=self.checkpoint_step())
                return 0
            if ran.rc == 2 or ran.user_stop:  # the job refused its input, or a person stopped it
                return ran.rc
            if ran.grow:
                self.event("grow", from_np=got["np"], step=self.checkpoint_step())
                continue
            lost = sorted(lost_hosts("".join(ran.tail)) & {h.name for h in hosts})
            step = self.checkpoint_step()
            restarts += 1
            self.event("failure", rc=ran.rc, lost_hosts=lost, step=step, why=ran.why)
            left = f"; host(s) {', '.join(lost)} left out for {self.opts.cooldown:.0f} s" if lost else ""
            self.say(f"the job failed (exit code {ran.rc}) at checkpoint step {step}{left}")
            for h in lost:
                self.excluded[h] = time.monotonic() + self.opts.cooldown
            if step == last_failed_at and not lost:
                self.say(f"failed again with no step won since the last failure (checkpoint step {step}): "
                         f"{ran.why or 'see the messages above'}; stopping")
                return ran.rc
            if restarts > self.opts.max_restarts:
                self.say(f"{restarts - 1} restarts used (--max-restarts {self.opts.max_restarts}); stopping")
                return ran.rc
            last_failed_at = step

    def once(self, hosts: list[Host], got: dict[str, Any], resume: Optional[int]) -> Supervision:
        """One job on ``hosts`` at the world ``got``, resumed when there is a checkpoint."""
        args = apply_changes(list(self.opts.args), got.get("changes") or {})
        if resume is not None and "--resume" not in args:
            args.append("--resume")
        fd, hostfile = tempfile.mkstemp(prefix="hvdhybrid-elastic-", suffix=".hosts")
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{h.name} slots={h.slots}\n" for h in hosts)
        try:
            cmd = launch_command(got["np"], hostfile, False, args, self.opts.map_by)
            watch = _Watch(self, got["np"], resume)
            return supervise(cmd, got["np"], watch=watch)
        finally:
            os.unlink(hostfile)

    def could_grow(self, np_now: int, since: Optional[int]) -> bool:
        """Whether discovery now offers enough slots for a larger world than ``np_now``, once the job has
        written a checkpoint beyond step ``since`` (the one it started from): it grows at a checkpoint
        it made, not while it starts."""
        if self.checkpoint_step() in (None, since):
            return False
        try:
            slots = min(self.opts.np_max, sum(h.slots for h in self.usable()))
        except InputError:
            return False
        if slots <= np_now:
            return False
        try:
            return int(self.fit_world(self.opts.args, slots)["np"]) > np_now
        except InputError:
            return False

    # -- records ----------------------------------------------------------------------------------
    def checkpoint_step(self) -> Optional[int]:
        """The step of the run's newest committed checkpoint (manifest written; no checksums read, so
        the watcher may look often: the job's resume verifies the files and falls back if it must)."""
        names = committed(os.path.join(self.out, "checkpoints"))
        return int(names[0].split("-")[1]) if names else None

    def announce(self, hosts: list[Host], got: dict[str, Any], resume: Optional[int]) -> None:
        from .plan import render_plan

        layout = Layout(got["np"], tuple(got["widths"]), got["tensor"])
        placed = place_ranks(hosts, got["np"], self.opts.map_by)
        where = f"resuming from checkpoint step {resume}" if resume is not None else "from the start"
        changes = got.get("changes") or {}
        changed = (f"; the layout options fit no world of these hosts, so changed: "
                   f"{describe_changes(changes)}") if changes else ""
        self.say(f"launching {got['np']} ranks on {', '.join(f'{h.name}:{h.slots}' for h in hosts)}, "
                 f"{where}{changed}:\n" + render_plan(layout, placed))
        self.event("launch", np=got["np"], hosts={h.name: h.slots for h in hosts}, layout=got["layout"],
                   resume_step=resume, changes=changes)

    def event(self, kind: str, **facts: Any) -> None:
        """One JSON line in the run's metrics.jsonl, written while no job runs; before the run's first
        job has made the file, kept until it has (a fresh run refuses an --out that holds one)."""
        self.pending.append(json.dumps({"event": kind, "time": time.time(), **facts}) + "\n")
        path = os.path.join(self.out, "metrics.jsonl")
        if os.path.exists(path):
            with open(path, "a") as f:
                f.writelines(self.pending)
            self.pending.clear()


class _Watch:
    """While a job runs: every ``interval`` seconds, ask discovery whether a larger world fits; if so,
    stop the job gently (it checkpoints) so the loop relaunches it larger."""

    def __init__(self, elastic: Elastic, np_now: int, since: Optional[int]) -> None:
        self.elastic, self.np_now, self.since = elastic, np_now, since

    def __call__(self, proc: Any, asked: threading.Event, done: threading.Event) -> bool:
        while not done.wait(self.elastic.opts.interval):
            if self.elastic.could_grow(self.np_now, self.since):
                self.elastic.say("more hosts are usable: stopping at the next step, with a checkpoint, "
                                 "to grow")
                asked.set()
                return True
        return False


def fit_in_subprocess(args: list[str], slots: int, keep_layout: bool = False) -> dict[str, Any]:
    """``hvdtrain plan -np SLOTS --fit --json ARGS`` in a fresh process (MPI is never started here)."""
    cmd = [sys.executable, "-m", "hvdhybrid", "plan", "-np", str(slots), "--fit", "--json",
           *(["--keep-layout"] if keep_layout else []), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode:
        lines = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()
        raise ElasticError(f"no layout fits {slots} slot(s): {lines[-1]}")
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))
