"""Defaults that work: every model command runs with no option but --steps (and the README's layouts)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import time

import pytest
from conftest import HVDTRAIN, ROOT, env

# (command words, ranks): each with nothing but --steps; the default --out lands in the cwd's runs/
COMMANDS = [
    (["mlp"], 1),
    (["resnet"], 1),
    (["bert"], 1),
    (["gpt"], 1),
    (["gpt2"], 1),
    (["grover", "pretrain"], 1),
    (["grover", "finetune"], 1),
    (["run", os.path.join(ROOT, "docs", "examples", "build_fn.py") + ":build"], 1),
    (["gpt2", "--tensor", "2", "--stages", "2"], 4),  # the README's tensor x pipeline command
]


def _run(words: list[str], ranks: int, cwd: str) -> subprocess.CompletedProcess[str]:
    cmd = [HVDTRAIN, *words, "--steps", "1"]
    if ranks > 1:
        cmd = ["mpirun", "-np", str(ranks), "--oversubscribe", "-x", "HVDHYBRID_PYTHON", "-x",
               "OMP_NUM_THREADS", *cmd]
    e = env()
    e["PYTHONPATH"] = ROOT
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("words,ranks", COMMANDS, ids=[" ".join(w[:2]) + f" x{n}" for w, n in COMMANDS])
def test_every_command_runs_with_only_steps(tmp_path, words: list[str], ranks: int) -> None:
    t0 = time.monotonic()
    r = _run(words, ranks, str(tmp_path))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    outs = glob.glob(os.path.join(str(tmp_path), "runs", "*", "summary.json"))
    assert len(outs) == 1, os.listdir(tmp_path)
    summary = json.load(open(outs[0]))
    assert summary["steps"] == 1 and summary["final_loss"] is not None
    cfg = json.load(open(os.path.join(os.path.dirname(outs[0]), "config.json")))
    assert set(cfg) >= {"parallel", "pipeline", "optim", "comm", "run", "layout"}, sorted(cfg)
    assert cfg["optim"]["steps"] == 1 and cfg["layout"]["world_size"] == ranks
    done = [line for line in r.stderr.splitlines() if "done: 1 steps" in line]
    assert done, r.stderr[-2000:]
    loss = done[-1].split("final loss ")[1].split(";")[0]
    assert len(loss) <= 6, f"the summary line's loss is not rounded: {loss}"
    assert time.monotonic() - t0 < 600
