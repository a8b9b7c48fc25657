"""A stuck job names its culprit: every rank says what it waits for, on --timeout and on SIGUSR2.

The hang is made on purpose: rank 1 runs GPipe while rank 0 runs 1F1B (HVDHYBRID_INJECT_SCHEDULE),
so rank 0 waits in its first backward for gradients rank 1 sends only after all its forwards,
and rank 1 waits for a forward's activations rank 0 sends only after that backward.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from conftest import HVDTRAIN, ROOT, env, mpirun

BASE = ["mlp", "--bundle-shape", "1,1", "--microbatches", "4", "--schedule", "1f1b", "--steps", "3",
        "--no-progress"]
MISMATCH = {"HVDHYBRID_INJECT_SCHEDULE": "1:gpipe"}
HOST = os.uname().nodename
RANK0 = ("rank 0 | bundle 0 | stage 0 (host ", "): in 0B0, waiting for gradients of microbatch 0 from "
         f"stage 1 to stage 0 from rank 1 | bundle 0 | stage 1 on host {HOST}")
RANK1 = ("rank 1 | bundle 0 | stage 1 (host ", "): in 1F2, waiting for activations of microbatch 2 from "
         f"stage 0 to stage 1 from rank 0 | bundle 0 | stage 0 on host {HOST}")


def _named(text: str, who: tuple[str, str]) -> bool:
    return any(x.strip().startswith(who[0]) and x.strip().endswith(who[1]) for x in text.splitlines())


def test_a_timeout_under_the_launcher_prints_every_rank_s_wait_together(tmp_path) -> None:
    e = dict(env(), **MISMATCH)
    t0 = time.monotonic()
    try:
        p = subprocess.run([HVDTRAIN, "launch", "-np", "2", "--", *BASE, "--timeout", "4",
                            "--out", str(tmp_path / "run")], cwd=ROOT, env=e, capture_output=True,
                           text=True, timeout=90)
    finally:
        subprocess.run(["pkill", "-9", "-f", str(tmp_path)], check=False)
    assert p.returncode != 0
    assert time.monotonic() - t0 < 45
    report = p.stderr.split("hvdtrain: what each rank was waiting for when the job ended:\n")
    assert len(report) == 2, p.stderr[-3000:]
    together = report[1].split("hvdtrain: ")[0]  # the block, up to the launcher's next line
    assert _named(together, RANK0) and _named(together, RANK1), p.stderr[-3000:]


def test_a_timeout_under_plain_mpirun_has_each_rank_say_its_line(tmp_path) -> None:
    r = mpirun(2, *BASE, "--timeout", "4", "--out", str(tmp_path / "run"), extra_env=MISMATCH, timeout=90)
    assert r.rc != 0
    lines = [x[len("[hang report] "):] for x in r.err.splitlines() if x.startswith("[hang report] ")]
    assert _named("\n".join(lines), RANK0) and _named("\n".join(lines), RANK1), r.err[-3000:]
    hang = tmp_path / "run" / "hang"  # and the lines are on disk, a file per rank
    assert sorted(os.listdir(hang)) == ["rank-00000.txt", "rank-00001.txt", "trigger"]


def test_sigusr2_to_the_launcher_reports_a_stuck_job_without_ending_it(tmp_path) -> None:
    e = dict(env(), **MISMATCH)
    out = str(tmp_path / "run")
    p = subprocess.Popen([HVDTRAIN, "launch", "-np", "2", "--", *BASE, "--timeout", "120", "--out", out],
                         cwd=ROOT, env=e, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not os.path.exists(os.path.join(out, "config.json")):
            time.sleep(0.2)
        time.sleep(2)  # into the first step, stuck
        p.send_signal(signal.SIGUSR2)
        time.sleep(5)
        assert p.poll() is None  # a report does not end the job
        p.send_signal(signal.SIGTERM)
        p.send_signal(signal.SIGTERM)  # a second signal: stop at once
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
        subprocess.run(["pkill", "-9", "-f", out], check=False)
    block = err.split("hvdtrain: what each rank was waiting for now:\n")
    assert len(block) >= 2, err[-3000:]
    assert _named(block[1], RANK0) and _named(block[1], RANK1), err[-3000:]
