"""hvdtrain plan --auto and --layout auto through the CLI: the ranked layouts, the memory limit, bad input
(one line, exit 2), and the planner's picks trained against one process (1e-5)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import HVDTRAIN, max_diff, mpirun, params, run

from hvdhybrid.planner.space import Choice

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


# bad input to the planner (a limit nothing fits, not a size, no command, a hostfile with no usable
# host, ...): tests/e2e/test_bad_inputs.py, which also writes docs/bad-inputs.md


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
    knobs = Choice(**plan["chosen"]["settings"]).knobs()  # the chosen layout, flat or of stage widths
    flat = {k: v for name, section in cfg.items() if isinstance(section, dict) and name != "layout"
            for k, v in section.items()}  # the knobs as given ("layout" is what they resolved to)
    assert {k: flat[k] for k in knobs} == knobs, (knobs, cfg)
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


def test_plan_auto_weighs_stage_widths_but_not_a_tie_across_unequal_ones() -> None:
    """GPT-2 ties its embedding to its head (first and last stage group): a run refuses stage groups of
    different widths there, so the planner does not offer them; other widths it does."""
    r = run([HVDTRAIN, "plan", "-np", "4", "--auto", "--json", "--top", "5000", *GPT2])
    assert r.rc == 0, r.err[-3000:]
    ranked = json.loads(r.out[r.out.index("{"):])["ranked"]
    opts = [x["options"] for x in ranked]
    widths = [o[o.index("--bundle-shape") + 1] for o in opts if "--bundle-shape" in o]
    assert widths and all(w.split(",")[0] == w.split(",")[-1] for w in widths), sorted(set(widths))
