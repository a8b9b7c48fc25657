"""``hvdtrain gpt`` (TeraPipe token slices) through the CLI: sliced pipelines end where one rank on whole
sequences ends; ``gpt configs`` and ``gpt plan-slices``; bad input is one line, exit 2, nothing written;
a checkpoint of a sliced run resumes at another slicing."""

from __future__ import annotations

import json
import os

import pytest
from conftest import HVDTRAIN, max_diff, mpirun, params, run

# SGD: Adam divides each gradient by its own running magnitude, so on the few weights whose
# gradient is ~1e-9 (a unit that GELU keeps near zero) it turns float rounding into 1e-5 moves;
# tests/mpi/test_gpt.py and this file hold the layouts to 1e-5 with SGD + momentum.
GPT = ["gpt", "--config", "tiny", "--seq-len", "48", "--limit", "200", "--batch-size", "8",
       "--no-progress", "--seed", "3", "--no-fp16-compression", "--optimizer", "sgd", "--lr", "0.05",
       "--save-params", "--schedule", "gpipe"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("gpt") / "one")
    r = mpirun(1, *GPT, "--steps", "3", "--slices", "1", "--out", out)
    assert r.rc == 0, r.err[-3000:]
    return out


@pytest.mark.parametrize("np_,layout", [
    (2, ["--stages", "2", "--slices", "4"]),
    (2, ["--stages", "2", "--slices", "auto", "--microbatches", "2"]),
    (4, ["--stages", "4", "--slices", "16,12,12,8"]),
    (4, ["--stages", "2", "--slices", "20,16,12", "--fp16-compression"]),
    (4, ["--stages", "2", "--tensor", "2", "--slices", "20,16,12"]),
    (2, ["--stages", "2", "--slices", "1", "--recompute", "full"]),
], ids=["2stages-uniform", "2stages-planned-mb2", "4stages-explicit", "2stages-2bundles-fp16",
        "2stages-tensor2", "2stages-whole-sequences-full-recompute"])
def test_sliced_runs_end_where_one_rank_ends(one_rank: str, tmp_path, np_: int, layout: list[str]) -> None:
    out = str(tmp_path / "run")
    r = mpirun(np_, *GPT, "--steps", "3", *layout, "--out", out)
    assert r.rc == 0, r.err[-3000:]
    bound = 2e-3 if "--fp16-compression" in layout else 1e-5
    assert max_diff(params(out), params(one_rank)) <= bound
    if "auto" in layout:  # the plan measured here (it may keep short sequences whole) is what ran
        lat = json.load(open(os.path.join(out, "latency.json")))
        assert sum(lat["plan"]) == 48 and lat["predicted_s"] > 0
        said = "whole sequences" if len(lat["plan"]) == 1 else ",".join(map(str, lat["plan"]))
        assert said in r.err
    elif "full" not in layout:
        assert "token slices" in r.err


def test_resume_a_sliced_run_without_slices(tmp_path) -> None:
    """Slicing is not part of the model: 2 steps at 2 stages x 3 slices, then 2 more on one rank,
    equal 4 steps on one rank."""
    whole = str(tmp_path / "whole")
    r = mpirun(1, *GPT, "--steps", "4", "--slices", "1", "--out", whole)
    assert r.rc == 0, r.err[-3000:]
    out = str(tmp_path / "resumed")
    r = mpirun(2, *GPT, "--steps", "2", "--stages", "2", "--slices", "3", "--out", out)
    assert r.rc == 0, r.err[-3000:]
    r = mpirun(1, *GPT, "--steps", "4", "--slices", "1", "--resume", "--out", out)
    assert r.rc == 0 and "at step 2" in r.err, r.err[-3000:]
    assert max_diff(params(out), params(whole)) <= 1e-5


def test_configs_lists_gpt3_shapes_with_parameter_counts() -> None:
    r = run([HVDTRAIN, "gpt", "configs"])
    assert r.rc == 0, r.err
    rows = {line.split()[0]: line.split() for line in r.out.splitlines()[1:] if line and line[0] != "p"}
    assert {"tiny", "gpt3-small", "gpt3-175b"} <= set(rows)
    # with GPT-3's vocabulary, the counts are the paper's: 125M and 175B
    assert abs(int(rows["gpt3-small"][-1].replace(",", "")) / 125e6 - 1) < 0.01
    assert abs(int(rows["gpt3-175b"][-1].replace(",", "")) / 175e9 - 1) < 0.01


def test_plan_slices_prints_plan_and_uniform_alternatives() -> None:
    r = run([HVDTRAIN, "gpt", "plan-slices", "--config", "tiny", "--seq-len", "128", "--stages", "2",
             "--json"])
    assert r.rc == 0, r.err
    got = json.loads(r.out)
    assert sum(got["plan"]["lengths"]) == 128
    assert got["uniform"] and all(u["predicted_s"] >= got["plan"]["predicted_s"] * (1 - 1e-9)
                                  for u in got["uniform"])
    r = run([HVDTRAIN, "gpt", "plan-slices", "--config", "gpt3-175b", "--stages", "8"])
    assert r.rc == 0, r.err
    assert "counted" in r.out and "planned:" in r.out and "best uniform" in r.out


def test_bad_plan_slices_input() -> None:
    for args, says in ((["--stages", "0"], "--stages 0"), (["--seq-len", "100", "--granularity", "7"],
                                                          "--granularity 7")):
        r = run([HVDTRAIN, "gpt", "plan-slices", "--config", "tiny", *args])
        assert r.rc == 2 and says in r.err and r.err.count("error:") == 1, r.err
