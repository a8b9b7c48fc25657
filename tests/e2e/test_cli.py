"""The real `hvdtrain` under mpirun and horovodrun: outputs, transparency, errors, failures."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import HVDTRAIN, ROOT, horovodrun, max_diff, mpirun, params, run

FAST = ["--steps", "4", "--batch-size", "32", "--no-progress", "--seed", "3"]




@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """One process, no launcher: the run every layout must reproduce."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    r = run([HVDTRAIN, "mlp", *FAST, "--microbatches", "1", "--out", out, "--save-params"])
    assert r.rc == 0, r.err
    return params(out)


def test_mpirun_pipeline_writes_outputs_and_matches_single_process(tmp_path, reference) -> None:
    out = str(tmp_path / "run")
    r = mpirun(4, "mlp", *FAST, "--bundle-shape", "1,1", "--schedule", "gpipe",
               "--no-fp16-compression", "--out", out, "--save-params")
    assert r.rc == 0, r.err[-3000:]
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 4 and 0.0 <= summary["eval_accuracy"] <= 1.0
    assert "[rank 0 | bundle 0 | stage 0]" in r.err
    assert max_diff(params(out), reference) <= 1e-5


def test_horovodrun_with_fp16_compression_stays_within_bound(tmp_path, reference) -> None:
    out = str(tmp_path / "run")
    r = horovodrun(4, "mlp", *FAST, "--stages", "1", "--out", out,
                   "--save-params")
    assert r.rc == 0, r.err[-3000:]
    assert max_diff(params(out), reference) <= 2e-3


def test_mpirun_hostfile_resnet_front_rear(tmp_path) -> None:
    out = str(tmp_path / "run")
    r = mpirun(4, "resnet", "--steps", "3", "--batch-size", "16", "--no-progress", "--out", out,
               hostfile=os.path.join(ROOT, "hostfiles", "localhost"))
    assert r.rc == 0, r.err[-3000:]
    assert "2 bundle(s) x stages of width 1,1" in r.err
    assert os.path.exists(os.path.join(out, "summary.json"))


def test_horovodrun_gloo_is_refused_with_one_clear_line(tmp_path) -> None:
    r = horovodrun(2, "mlp", *FAST, "--out", str(tmp_path / "x"), gloo=True, timeout=120)
    assert r.rc != 0
    text = r.out + r.err
    assert text.count("hvdtrain: error:") == 1 and "horovodrun --gloo" in text
    assert not (tmp_path / "x").exists()


def test_bad_layout_is_one_line_exit_2_and_writes_nothing(tmp_path) -> None:
    r = mpirun(3, "mlp", *FAST, "--bundle-shape", "2,2", "--out", str(tmp_path / "x"), timeout=120)
    assert r.rc == 2
    errors = [x for x in (r.out + r.err).splitlines() if x.startswith("hvdtrain: error:")]
    assert len(errors) == 1 and "world size 3 is not divisible by bundle size 4" in errors[0]
    assert "Traceback" not in r.err
    assert not (tmp_path / "x").exists()


def test_existing_run_is_not_overwritten(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    r = mpirun(2, "mlp", *FAST, "--out", str(out), timeout=120)
    assert r.rc == 2 and "already holds a run" in r.err
    assert (out / "metrics.jsonl").read_text() == "precious\n"


def test_a_failing_rank_ends_every_rank_quickly_and_is_named(tmp_path) -> None:
    r = mpirun(4, "mlp", "--steps", "50", "--batch-size", "32", "--no-progress", "--stages", "2",
               "--out", str(tmp_path / "run"), extra_env={"HVDHYBRID_INJECT_FAILURE": "3:2"},
               timeout=120)
    assert r.rc != 0
    assert "[rank 3 | bundle 1 | stage 1] failed" in r.err and "injected failure" in r.err
    assert r.seconds < 60


def test_plan_and_launch_dry_run(tmp_path) -> None:
    r = run([HVDTRAIN, "plan", "-np", "8", "--bundle-shape", "1,3",
             "--hostfile", os.path.join(ROOT, "hostfiles", "localhost")])
    assert r.rc == 2 and "needs 8 slots" in r.err  # localhost has 4 slots
    bad = tmp_path / "hosts"
    bad.write_text("node1:4\n")
    r = run([HVDTRAIN, "launch", "-np", "2", "--hostfile", str(bad), "--", "mlp"])
    assert r.rc == 2 and f"{bad}:1:" in r.err and "Traceback" not in r.err
