"""hvdtrain plan --auto and --layout auto through the CLI: the ranked layouts, the memory limit, bad input
(one line, exit 2), and the planner's picks trained against one process (1e-5)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import HVDTRAIN, max_diff, mpirun, params, run

MLP = ["mlp", "--batch-size", "32", "--no-progress", "--seed", "5", "--no-fp16-compression", "--steps", "4",
       "--save-params"]
GPT2 = ["gpt2", "--size", "tiny", "--seq-len", "32", "--limit", "400", "--batch-size", "8", "--no-progress",
        "--seed", "3", "--steps", "3", "--no-fp16-compression", "--save-params", "--optimizer", "sgd",
        "--lr", "0.05", "--sample-tokens", "0"]


def test_plan_auto_ranks_layouts_and_keeps_to_the_memory_limit() -> None:
    r = run([HVDTRAIN, "plan", "-np", "4", "--auto", "--json", "--top", "500", *MLP[:-1]])
    assert r.rc == 0, r.err[-3000:]
    got = json.loads(r.out[r.out.index("{"):])
    ranked = got["ranked"]
    assert got["layouts"] > 20 and ranked
    assert [x["step_s"] for x in ranked] == sorted(x["step_s"] for x in ranked)
    assert {x["options"][1] for x in ranked} == {"1"}  # mlp does not split its tensors
    assert any(x["options"][3] == "2" for x in ranked)  # 2 stages are weighed too
    # a limit between the smallest and the largest layout's memory: only those under it are printed
    big = [*MLP[:-1], "--hidden", "1024", "--depth", "8"]  # 7 M parameters: memory spreads over 30 MB
    r = run([HVDTRAIN, "plan", "-np", "4", "--auto", "--json", "--top", "500", *big])
    assert r.rc == 0, r.err[-3000:]
    mems = sorted(x["memory"] for x in json.loads(r.out[r.out.index("{"):])["ranked"])
    assert mems[-1] - mems[0] > 20 * 2**20
    limit = (mems[0] + mems[-1]) // 2
    r = run([HVDTRAIN, "plan", "-np", "4", "--auto", "--json", "--top", "500", "--max-memory", str(limit),
             *big])
    assert r.rc == 0, r.err[-3000:]
    under = json.loads(r.out[r.out.index("{"):])
    assert under["ranked"] and all(x["memory"] <= limit for x in under["ranked"]) and under["too_big"] > 0
    text = run([HVDTRAIN, "plan", "-np", "4", "--auto", *MLP[:-1]])
    assert text.rc == 0 and "chosen: --tensor 1" in text.out and "s/step" in text.out


@pytest.mark.parametrize("args, message", [
    (["--auto", "--max-memory", "1MB", *MLP], "no layout of 4 ranks fits --max-memory 1 MB per rank; the "
                                              "least memory is"),
    (["--auto", "--max-memory", "lots", *MLP], "--max-memory 'lots' is not a size"),
    (["--auto"], "--auto plans a model command"),
    (["--max-memory", "2GB", *MLP], "--max-memory is a limit for --auto; add --auto"),
    (["--auto", "grover", "pretrain", "--stages", "2"], "sets its own stage widths"),
], ids=["nothing-fits", "bad-size", "no-command", "limit-without-auto", "own-widths"])
def test_plan_auto_bad_input_is_one_line(args: list[str], message: str) -> None:
    r = run([HVDTRAIN, "plan", "-np", "4", *args])
    assert r.rc == 2, (r.rc, r.err[-2000:])
    lines = [x for x in r.err.splitlines() if x.startswith("hvdtrain: error")]
    assert len(lines) == 1 and message in lines[0], r.err[-2000:]
    assert "Traceback" not in r.err


def test_plan_auto_refuses_a_hostfile_with_no_usable_host(tmp_path) -> None:
    empty = tmp_path / "hosts"
    empty.write_text("# nothing here\n")
    r = run([HVDTRAIN, "plan", "-np", "4", "--auto", "--hostfile", str(empty), *MLP])
    assert r.rc == 2 and "Traceback" not in r.err, r.err[-2000:]
    assert len([x for x in r.err.splitlines() if x.startswith("hvdtrain: error")]) == 1


@pytest.mark.parametrize("model", [MLP, GPT2], ids=["mlp", "gpt2"])
def test_layout_auto_trains_the_planners_pick_as_one_process(tmp_path, model: list[str]) -> None:
    one = str(tmp_path / "one")
    r = run([HVDTRAIN, *model, "--out", one])
    assert r.rc == 0, r.err[-3000:]
    out, trace = str(tmp_path / "auto"), str(tmp_path / "trace.json")
    r = mpirun(4, *model, "--layout", "auto", "--out", out, "--trace", trace)
    assert r.rc == 0, r.err[-3000:]
    assert "--layout auto chose --tensor" in r.err
    plan = json.load(open(os.path.join(out, "plan.json")))
    cfg = json.load(open(os.path.join(out, "config.json")))
    s = plan["chosen"]["settings"]
    assert (cfg["parallel"]["tensor"], cfg["parallel"]["stages"], cfg["pipeline"]["schedule"],
            cfg["optim"]["zero"]) == (s["tensor"], s["stages"], s["schedule"], s["zero"])
    assert max_diff(params(out), params(one)) <= 1e-5
    # the prediction against the run: the step, and each action kind from the trace
    r = run([HVDTRAIN, "plan", "-np", "1", "--check", out, "--trace", trace, "--json"])
    assert r.rc == 0, r.err[-3000:]
    got = json.loads(r.out)
    assert got["measured_step_s"] > 0 and got["predicted_step_s"] > 0
    assert got["kinds"]["F"]["count"] > 0 and got["kinds"]["F"]["measured_s"] > 0
    assert got["kinds"]["F"]["predicted_s"] > 0 and "optimizer" in got["kinds"]
    text = run([HVDTRAIN, "plan", "-np", "1", "--check", out, "--trace", trace])
    assert text.rc == 0 and "step: predicted" in text.out and "predicted parts" in text.out
    bad = run([HVDTRAIN, "plan", "-np", "1", "--check", one])
    assert bad.rc == 2 and "no plan.json there" in bad.err and "Traceback" not in bad.err


def test_under_a_limit_one_process_exceeds_the_planners_choice_trains_within_it(tmp_path) -> None:
    """The bench MLP at 1024 x 8 (8.4 M parameters): one process needs its parameters, gradients and
    momentum whole; the limit sits between that and the smallest layout of 4 ranks."""
    big = [*MLP[:-1], "--hidden", "1024", "--depth", "8", "--steps", "3"]
    r = run([HVDTRAIN, "plan", "-np", "1", "--auto", "--json", *big])
    assert r.rc == 0, r.err[-3000:]
    alone = min(x["memory"] for x in json.loads(r.out[r.out.index("{"):])["ranked"])
    r = run([HVDTRAIN, "plan", "-np", "4", "--auto", "--json", "--top", "1000", *big])
    assert r.rc == 0, r.err[-3000:]
    least = min(x["memory"] for x in json.loads(r.out[r.out.index("{"):])["ranked"])
    assert least < alone - 40 * 2**20, (least, alone)
    limit = alone - 2**20  # one process is over it; a run's rank 0 also counts MPI in the libraries at rest
    out = str(tmp_path / "auto")
    r = mpirun(4, *big, "--layout", "auto", "--max-memory", str(limit), "--out", out)
    assert r.rc == 0, r.err[-3000:]
    plan = json.load(open(os.path.join(out, "plan.json")))
    assert plan["chosen"]["memory"] <= limit
    figs = ("parameters", "gradients", "optimizer", "activations_peak")
    held = max(sum(m[f] for f in figs) for m in json.load(open(os.path.join(out, "memory.json"))))
    assert held + plan["rest"] <= limit  # what the run counted, plus the libraries at rest


def test_layout_auto_that_nothing_fits_ends_every_rank_with_one_line(tmp_path) -> None:
    r = mpirun(4, *MLP, "--layout", "auto", "--max-memory", "1MB", "--out", str(tmp_path / "x"))
    assert r.rc != 0 and "Traceback" not in r.err, r.err[-3000:]
    lines = [x for x in r.err.splitlines() if "error:" in x]
    assert len(lines) == 1 and "fits --max-memory 1 MB per rank" in lines[0], r.err[-3000:]
    assert not os.path.exists(tmp_path / "x")
