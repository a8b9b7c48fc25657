"""Nothing lost, nothing hung: exact resume, killed ranks, a kill during a checkpoint write, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import torch
from conftest import HVDTRAIN, ROOT, env, mpirun, params

from hvdhybrid.training.checkpoint import find_complete, verify

# a pipeline layout with bundles: 2 bundles x 2 stages on 4 ranks, fp16 compression on
BASE = ["mlp", "--bundle-shape", "1,1", "--batch-size", "32", "--no-progress", "--seed", "5"]


def losses(out: str) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
            if "step" in m}  # event lines ("resumed") have none



def test_resume_is_exact_bit_for_bit(tmp_path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    r = mpirun(4, *BASE, "--steps", "6", "--out", a, "--save-params")
    assert r.rc == 0, r.err[-3000:]
    r = mpirun(4, *BASE, "--steps", "3", "--out", b)
    assert r.rc == 0, r.err[-3000:]
    assert verify(os.path.join(b, "checkpoints", "step-000003")).step == 3
    r = mpirun(4, *BASE, "--steps", "6", "--out", b, "--resume", "--save-params")
    assert r.rc == 0, r.err[-3000:]
    assert "resumed from" in r.err
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert losses(a) == losses(b)  # steps 1-3 from the first run, 4-6 after the resume


def gone_within(stamp: str, seconds: float, out: str) -> None:
    """Every process of the job ended within ``seconds`` of the injected failure."""
    ended = time.time()
    assert ended - float(open(stamp).read()) < seconds
    left = subprocess.run(["pgrep", "-f", out], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left behind: {left}"


def test_kill_9_mid_step_stops_every_rank_and_keeps_the_last_checkpoint(tmp_path) -> None:
    out, stamp = str(tmp_path / "run"), str(tmp_path / "stamp")
    # synchronous writes: step 4's checkpoint is committed before step 5 starts
    r = mpirun(4, *BASE, "--steps", "40", "--checkpoint-every", "2", "--checkpoint-sync", "--out", out,
               extra_env={"HVDHYBRID_INJECT_FAILURE": "3:5:step:kill",
                          "HVDHYBRID_INJECT_STAMP": stamp}, timeout=120)
    assert r.rc != 0
    gone_within(stamp, 30, out)
    assert "rank 3" in r.err and "signal 9" in r.err
    path, warnings = find_complete(os.path.join(out, "checkpoints"))
    assert path is not None and path.endswith("step-000004") and not warnings
    r = mpirun(4, *BASE, "--steps", "6", "--out", out, "--resume")
    assert r.rc == 0 and "at step 4" in r.err, r.err[-3000:]


def test_launcher_names_bundle_and_stage_of_a_killed_rank(tmp_path) -> None:
    out = str(tmp_path / "run")
    e = env()
    e["HVDHYBRID_INJECT_FAILURE"] = "3:3:step:kill"
    try:
        p = subprocess.run([HVDTRAIN, "launch", "-np", "4", "--", *BASE, "--steps", "40", "--out", out],
                           cwd=ROOT, env=e, capture_output=True, text=True, timeout=120)
    finally:  # never leave a job behind
        subprocess.run(["pkill", "-9", "-f", out], check=False)
    assert p.returncode != 0
    assert "hvdtrain: rank 3 | bundle 1 | stage 1 was killed by signal 9" in p.stderr


def test_a_kill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path) -> None:
    out = str(tmp_path / "run")
    r = mpirun(4, *BASE, "--steps", "40", "--checkpoint-every", "2", "--out", out,
               extra_env={"HVDHYBRID_INJECT_FAILURE": "1:4:ckpt:kill"}, timeout=120)
    assert r.rc != 0
    ckpts = os.path.join(out, "checkpoints")
    assert not os.path.exists(os.path.join(ckpts, "step-000004", "manifest.json"))
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step-000002"
    r = mpirun(4, *BASE, "--steps", "5", "--out", out, "--resume")
    assert r.rc == 0, r.err[-3000:]
    assert "skipping checkpoint" in r.err and "at step 2" in r.err


def test_an_exception_in_one_rank_names_it_and_ends_the_job(tmp_path) -> None:
    out, stamp = str(tmp_path / "run"), str(tmp_path / "stamp")
    r = mpirun(4, *BASE, "--steps", "40", "--out", out,
               extra_env={"HVDHYBRID_INJECT_FAILURE": "2:3", "HVDHYBRID_INJECT_STAMP": stamp},
               timeout=120)
    assert r.rc != 0
    gone_within(stamp, 30, out)
    assert "[rank 2 | bundle 1 | stage 0] failed" in r.err and "injected failure" in r.err


def test_sigterm_to_the_launcher_checkpoints_and_exits(tmp_path) -> None:
    out = str(tmp_path / "run")
    p = subprocess.Popen([HVDTRAIN, "launch", "-np", "4", "--", *BASE, "--steps", "100000",
                          "--out", out], cwd=ROOT, env=env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        metrics = os.path.join(out, "metrics.jsonl")
        while time.monotonic() < deadline and not (os.path.exists(metrics)
                                                   and os.path.getsize(metrics) > 0):
            time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:  # never leave a job behind, whatever happened above
        p.kill()
        subprocess.run(["pkill", "-9", "-f", out], check=False)
    assert p.returncode != 0
    assert "stopped by signal" in err
    path, _ = find_complete(os.path.join(out, "checkpoints"))
    assert path is not None
    step = verify(path).step
    assert step == max(losses(out))  # the checkpoint is of the last finished step
