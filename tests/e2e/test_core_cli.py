"""The core types through the real CLI: resume into other layouts, several stages per rank,
evaluation over every held-out row at every layout."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import HVDTRAIN, max_diff, mpirun, params, run

BASE = ["mlp", "--batch-size", "32", "--no-progress", "--seed", "5", "--no-fp16-compression",
        "--microbatches", "2"]
GROVER_FT = ["grover", "finetune", "--config", "tiny", "--no-progress", "--seed", "1", "--batch-size", "8",
             "--optimizer", "sgd", "--no-fp16-compression", "-m", "2"]




def summary(out: str) -> dict[str, float]:
    return json.load(open(os.path.join(out, "summary.json")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("mlp") / "one")
    r = run([HVDTRAIN, *BASE, "--steps", "6", "--out", out, "--save-params"])
    assert r.rc == 0, r.err[-3000:]
    return out


@pytest.fixture(scope="module")
def saved_2x2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """3 steps at 2 bundles x 2 stages."""
    out = str(tmp_path_factory.mktemp("mlp") / "2x2")
    r = mpirun(4, *BASE, "--bundle-shape", "1,1", "--steps", "3", "--out", out)
    assert r.rc == 0, r.err[-3000:]
    return out


@pytest.mark.parametrize("layout", [["--stages", "4"], [], ["--stages", "2", "--stages-per-rank", "2"]],
                         ids=["1x4", "4x1", "2x2-with-4-stages"])
def test_resume_into_another_layout_continues_as_if_never_stopped(
        saved_2x2: str, uninterrupted: str, tmp_path, layout: list[str]) -> None:
    out = str(tmp_path / "resumed")
    shutil.copytree(saved_2x2, out)
    r = mpirun(4, *BASE, *layout, "--steps", "6", "--resume", "--out", out, "--save-params")
    assert r.rc == 0, r.err[-3000:]
    assert "resumed from" in r.err and "at step 3" in r.err
    assert max_diff(params(out), params(uninterrupted)) <= 1e-5


def test_full_recompute_with_a_split_backward_matches_one_process(uninterrupted: str, tmp_path) -> None:
    out = str(tmp_path / "recomputed")
    r = mpirun(2, *BASE, "--stages", "2", "--schedule", "zb1", "--recompute", "full", "--steps", "6",
               "--out", out, "--save-params")
    assert r.rc == 0, r.err[-3000:]
    assert max_diff(params(out), params(uninterrupted)) <= 1e-5


def test_several_stages_per_rank_match_one_process(uninterrupted: str, tmp_path) -> None:
    out = str(tmp_path / "looped")
    r = mpirun(2, *BASE, "--stages", "2", "--stages-per-rank", "2", "--placement", "looped",
               "--steps", "6", "--out", out, "--save-params")
    assert r.rc == 0, r.err[-3000:]
    assert "4 model stages placed looped: stages 0,2 on position 0; 1,3 on position 1" in r.err
    assert max_diff(params(out), params(uninterrupted)) <= 1e-5


def test_eval_counts_every_held_out_row_at_every_layout(tmp_path) -> None:
    """359 held-out digits: every layout reports the accuracy of all 359 (it used to drop 2 to 7)."""
    results = []
    for i, (np_, layout) in enumerate([(1, []), (2, ["--stages", "2"]), (4, ["--bundle-shape", "1,3"]),
                                       (4, ["--bundle-shape", "1,1"])]):
        out = str(tmp_path / f"l{i}")
        r = mpirun(np_, *BASE, *layout, "--batch-size", "48", "--steps", "4", "--out", out)
        assert r.rc == 0, r.err[-3000:]
        results.append((summary(out)["eval_rows"], summary(out)["eval_accuracy"]))
    assert [n for n, _ in results] == [359] * 4
    assert all(acc == pytest.approx(results[0][1], abs=1e-12) for _, acc in results)


def test_grover_resumes_from_task_parallel_into_one_rank(tmp_path) -> None:
    """A build-then-drop model (GROVER): 2 task-parallel ranks -> 1 rank, momentum by name.

    SGD, as in test_grover.py: Adam turns the float noise of an exactly-zero gradient
    (the attention's key bias) into steps of size lr. Adam moments reshard in tests/mpi.
    """
    one, tp = str(tmp_path / "one"), str(tmp_path / "tp")
    r = run([HVDTRAIN, *GROVER_FT, "--steps", "4", "--out", one, "--save-params"])
    assert r.rc == 0, r.err[-3000:]
    r = mpirun(2, *GROVER_FT, "--task-parallel", "--steps", "2", "--out", tp)
    assert r.rc == 0, r.err[-3000:]
    r = run([HVDTRAIN, *GROVER_FT, "--steps", "4", "--resume", "--out", tp, "--save-params"])
    assert r.rc == 0, r.err[-3000:]
    assert "resumed from" in r.err
    assert max_diff(params(tp), params(one)) <= 1e-5


def test_zero_bubble_and_lr_schedule_through_the_cli_match_one_process(tmp_path) -> None:
    """`--schedule zb1` (W split from B) with `--warmup 2 --lr-schedule cosine`, 2 bundles x 2 stages."""
    flags = ["--steps", "6", "--warmup", "2", "--lr-schedule", "cosine", "--save-params"]
    one, four = str(tmp_path / "one"), str(tmp_path / "four")
    r = run([HVDTRAIN, *BASE, *flags, "--out", one])
    assert r.rc == 0, r.err[-3000:]
    r = mpirun(4, *BASE, *flags, "--bundle-shape", "1,1", "--schedule", "zb1", "--out", four)
    assert r.rc == 0, r.err[-3000:]
    assert max_diff(params(four), params(one)) <= 1e-5
