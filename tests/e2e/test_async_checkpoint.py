"""Checkpoints written in the background: kill -9 at random moments during the writes, and every resume
starts from a complete checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time

import torch
from conftest import HVDTRAIN, ROOT, env, mpirun, params

from hvdhybrid.training.checkpoint import find_complete, verify

# 2 stages (each rank writes its own file), SGD with momentum: about 2 x 1 M parameters of state per rank
BASE = ["mlp", "--hidden", "1024", "--depth", "4", "--bundle-shape", "1,1", "--batch-size", "32",
        "--no-progress", "--seed", "3", "--checkpoint-every", "1", "--keep", "2"]
STEPS = 150


def _in_flight(ckpts: str, since: float) -> bool:
    """A checkpoint directory without its manifest, with a file written after ``since``: this run's
    write under way."""
    if not os.path.isdir(ckpts):
        return False
    for n in os.listdir(ckpts):
        d = os.path.join(ckpts, n)
        if n.startswith("step-") and not os.path.exists(os.path.join(d, "manifest.json")):
            try:
                if any(os.path.getmtime(os.path.join(d, f)) > since for f in os.listdir(d)):
                    return True
            except OSError:  # renamed or pruned as we looked
                continue
    return False


def test_kill_9_during_background_writes_always_resumes_from_a_complete_checkpoint(tmp_path) -> None:
    out = str(tmp_path / "run")
    ckpts = os.path.join(out, "checkpoints")
    rng = random.Random(7)
    resumed_from: list[int] = []
    caught_writing = 0
    for kill in range(10):
        resume = ["--resume"] if kill else []
        newest, _ = find_complete(ckpts)
        expect = verify(newest).step if newest else None  # what a resume must start from
        cmd = ["mpirun", "-np", "2", "--oversubscribe", "-x", "HVDHYBRID_PYTHON", "-x", "OMP_NUM_THREADS",
               HVDTRAIN, *BASE, "--steps", str(STEPS), "--out", out, *resume]
        since = time.time()
        p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        try:
            # past start-up and a first committed checkpoint, a write under way
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and p.poll() is None and not (
                    os.path.exists(os.path.join(ckpts, "latest")) and _in_flight(ckpts, since)):
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.6))
            caught_writing += _in_flight(ckpts, since)
            if p.poll() is None:  # else it ended by itself: what it said is checked below
                os.killpg(p.pid, signal.SIGKILL)
            _, err = p.communicate(timeout=30)
        finally:
            subprocess.run(["pkill", "-9", "-f", out], check=False)
        m = re.search(r"resumed from (\S+) at step (\d+)", err)
        if resume:
            assert m, f"kill {kill}: the run did not resume:\n{err[-2000:]}"
            # the newest complete checkpoint the kill left (verified by the resume before loading)
            assert int(m.group(2)) == expect and m.group(1).endswith(f"step-{expect:06d}"), err[-2000:]
            resumed_from.append(expect)
        # nothing committed was damaged: every checkpoint with a manifest verifies; latest names the
        # newest, or the one before when the kill fell between the manifest and latest (the resume
        # takes the newest complete one either way)
        committed = sorted(n for n in os.listdir(ckpts) if n.startswith("step-")
                           and os.path.exists(os.path.join(ckpts, n, "manifest.json")))
        assert committed, f"kill {kill}: no complete checkpoint left"
        for n in committed:
            verify(os.path.join(ckpts, n))
        assert open(os.path.join(ckpts, "latest")).read().strip() in committed[-2:]
    assert caught_writing >= 5, f"only {caught_writing} of 10 kills came during a write"
    assert len(resumed_from) >= 5 and resumed_from == sorted(resumed_from)
    r = mpirun(2, *BASE, "--steps", str(STEPS), "--out", out, "--resume", "--save-params", timeout=180)
    assert r.rc == 0, r.err[-3000:]
    whole = str(tmp_path / "whole")
    r = mpirun(2, *BASE, "--steps", str(STEPS), "--out", whole, "--checkpoint-sync", "--save-params",
               timeout=180)
    assert r.rc == 0, r.err[-3000:]
    a, b = params(out), params(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_background_and_synchronous_checkpoints_hold_the_same_state(tmp_path) -> None:
    runs = {}
    for mode in ("--checkpoint-async", "--checkpoint-sync"):
        out = str(tmp_path / mode.strip("-"))
        r = mpirun(2, *BASE, "--steps", "3", "--out", out, mode, timeout=120)
        assert r.rc == 0, r.err[-3000:]
        if mode == "--checkpoint-async":
            assert "written to" in r.err and "(in the background)" in r.err
        runs[mode] = out
    for step in (1, 2, 3):
        d = {m: os.path.join(o, "checkpoints", f"step-{step:06d}") for m, o in runs.items()}
        if not all(os.path.isdir(x) for x in d.values()):
            continue  # pruned (--keep 2)
        ma, ms = (verify(x) for x in d.values())
        assert ma.shards.keys() == ms.shards.keys() and ma.names == ms.names
        for f in ma.shards:
            if f == "common.pt":
                continue
            sa = torch.load(os.path.join(d["--checkpoint-async"], f), weights_only=False)
            ss = torch.load(os.path.join(d["--checkpoint-sync"], f), weights_only=False)
            for k in ("params", "optimizer"):
                assert repr(sa[k].keys()) == repr(ss[k].keys())
            for n, t in sa["params"].items():
                assert torch.equal(t, ss["params"][n]), (step, f, n)
        assert not [n for n in os.listdir(d["--checkpoint-async"]) if n.startswith("part-")]
