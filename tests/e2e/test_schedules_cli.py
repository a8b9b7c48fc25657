"""Interleaved 1F1B, ZB-V and V-Half, and the reduce overlapped with the backward, through the real CLI:
every model ends with one process's parameters (fp32, 1e-5) at 1, 2 and 4 bundles, with tensor 2, with
token slices; a layout a schedule cannot run is one line, exit 2."""

from __future__ import annotations

import pytest
from conftest import HVDTRAIN, max_diff, mpirun, params, run

MLP = ["mlp", "--depth", "8", "--batch-size", "32", "--no-progress", "--seed", "5", "--no-fp16-compression",
       "--microbatches", "4", "--steps", "4", "--save-params"]
GPT2 = ["gpt2", "--size", "tiny", "--seq-len", "32", "--limit", "400", "--batch-size", "16",
        "--no-progress", "--seed", "3", "--no-fp16-compression", "--lr", "1e-3", "--save-params",
        "--microbatches", "4", "--steps", "3"]
GPT = ["gpt", "--config", "tiny", "--seq-len", "48", "--limit", "200", "--batch-size", "8",
       "--no-progress", "--seed", "3", "--no-fp16-compression", "--optimizer", "sgd", "--lr", "0.05",
       "--save-params", "--microbatches", "2", "--steps", "3"]
BERT = ["bert", "--limit", "160", "--max-len", "16", "--batch-size", "16", "--accumulate", "2",
        "--clip-grad", "0.5", "--optimizer", "sgd", "--lr", "0.05", "--steps", "2", "--seed", "2",
        "--no-progress", "--save-params", "--no-fp16-compression", "--microbatches", "2"]
V = ["--stages-per-rank", "2"]


def _one(tmp_path_factory: pytest.TempPathFactory, name: str, args: list[str]) -> str:
    out = str(tmp_path_factory.mktemp(name) / "one")
    r = run([HVDTRAIN, *args, "--out", out])
    assert r.rc == 0, r.err[-3000:]
    return out


@pytest.fixture(scope="module")
def mlp_one(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _one(tmp_path_factory, "mlp", MLP)


@pytest.fixture(scope="module")
def gpt2_one(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _one(tmp_path_factory, "gpt2", GPT2)


def _check(np_: int, args: list[str], one: str, tmp_path, placed: str = "") -> None:
    out = str(tmp_path / "run")
    r = mpirun(np_, *args, "--out", out)
    assert r.rc == 0, r.err[-3000:]
    assert placed in r.err
    assert max_diff(params(out), params(one)) <= 1e-5


@pytest.mark.parametrize("np_,layout,placed", [
    (2, ["--stages", "2", "--schedule", "interleaved"], "placed looped: stages 0,2 on position 0"),
    (2, ["--stages", "2", "--schedule", "zbv"], "placed v: stages 0,3 on position 0; 1,2 on position 1"),
    (4, ["--bundle-shape", "1,1", "--schedule", "zbv", "--reduce", "overlap"], "bucket by bucket"),
    (4, ["--schedule", "interleaved", "--reduce", "overlap"], "bucket by bucket"),
    (4, ["--stages", "4", "--schedule", "interleaved"], "placed looped"),
    (4, ["--stages", "4", "--schedule", "vhalf"], "placed v: stages 0,7 on position 0"),
    (2, ["--stages", "2", "--schedule", "zbv", "--reduce", "overlap"], "one bundle: nothing to average"),
], ids=["interleaved", "zbv", "zbv-2-bundles-overlap", "interleaved-4-bundles-overlap",
        "interleaved-4-groups", "vhalf-4-groups", "overlap-with-one-bundle-falls-back"])
def test_mlp(mlp_one: str, tmp_path, np_: int, layout: list[str], placed: str) -> None:
    _check(np_, [*MLP, *V, *layout], mlp_one, tmp_path, placed)


@pytest.mark.parametrize("np_,layout", [
    (4, ["--stages", "2", "--tensor", "2", "--schedule", "zbv"]),
    (4, ["--bundle-shape", "1,1", "--schedule", "interleaved", "--reduce", "overlap"]),
    (4, ["--tensor", "2", "--reduce", "overlap", "--stages-per-rank", "1"]),
], ids=["zbv-tensor2", "interleaved-2-bundles-overlap", "tensor2-2-bundles-overlap"])
def test_gpt2(gpt2_one: str, tmp_path, np_: int, layout: list[str]) -> None:
    _check(np_, [*GPT2, *V, *layout], gpt2_one, tmp_path)


def test_gpt_with_token_slices(tmp_path_factory: pytest.TempPathFactory, tmp_path) -> None:
    one = _one(tmp_path_factory, "gpt", [*GPT, "--slices", "1"])
    _check(2, [*GPT, *V, "--stages", "2", "--schedule", "vhalf", "--slices", "3"], one, tmp_path)


def test_bert(tmp_path_factory: pytest.TempPathFactory, tmp_path) -> None:
    one = _one(tmp_path_factory, "bert", BERT)
    _check(2, [*BERT, *V, "--stages", "2", "--schedule", "interleaved"], one, tmp_path)
    _check(4, [*BERT, *V, "--bundle-shape", "1,1", "--schedule", "zbv", "--reduce", "overlap"], one,
           tmp_path / "2-bundles", "bucket by bucket")


BATCHED = "batched W: the weight gradients of up to"


@pytest.mark.parametrize("np_,layout,placed", [
    (2, ["--stages", "2", "--schedule", "zb1", "--stages-per-rank", "1", "--batch-w", "1"], ""),
    (2, ["--stages", "2", "--schedule", "zb1", "--stages-per-rank", "1", "--batch-w", "3", "--recompute",
         "full"], f"{BATCHED} 3 microbatches"),
    (4, ["--bundle-shape", "1,1", "--schedule", "zbv", "--batch-w", "2", "--reduce", "overlap"],
     f"{BATCHED} 2 microbatches"),
], ids=["zb1-unbatched", "zb1-batched-3-recompute", "zbv-batched-2-bundles-overlap"])
def test_mlp_batched_w(mlp_one: str, tmp_path, np_: int, layout: list[str], placed: str) -> None:
    """W of several microbatches as one product (zb1 batches all of a step's by default: the other
    files' zb1 cases run batched)."""
    _check(np_, [*MLP, *V, *layout], mlp_one, tmp_path, placed)


def test_gpt2_and_bert_batched_w(gpt2_one: str, tmp_path_factory: pytest.TempPathFactory, tmp_path) -> None:
    """GPT-2's Conv1D and tensor-parallel layers, BERT's embeddings and heads, under a batched W."""
    _check(4, [*GPT2, "--stages", "2", "--tensor", "2", "--schedule", "zb1"], gpt2_one, tmp_path / "gpt2",
           f"{BATCHED} 4 microbatches")
    one = _one(tmp_path_factory, "bert-w", BERT)
    _check(4, [*BERT, "--bundle-shape", "1,1", "--schedule", "zb1", "--reduce", "overlap"], one,
           tmp_path / "bert", f"{BATCHED} 2 microbatches")


def test_batched_w_it_cannot_apply_is_one_line_exit_2(tmp_path) -> None:
    r = mpirun(2, *MLP, "--stages", "2", "--schedule", "1f1b", "--batch-w", "2", "--out", str(tmp_path / "a"))
    assert r.rc == 2 and "--batch-w 2: schedule 1f1b computes weight gradients inside B" in r.err
    r = mpirun(2, *GPT, "--stages", "2", "--schedule", "zb1", "--slices", "3", "--batch-w", "2",
               "--out", str(tmp_path / "b"))
    assert r.rc == 2 and "with token slices each W runs a whole backward" in r.err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_layout_the_schedule_cannot_run_is_one_line_exit_2(tmp_path) -> None:
    out = str(tmp_path / "bad")
    r = mpirun(2, *MLP, "--stages", "2", "--schedule", "zbv", "--out", out)
    assert r.rc == 2 and "use --stages-per-rank 2" in r.err
    r = mpirun(2, *MLP, *V, "--stages", "2", "--schedule", "interleaved", "--placement", "contiguous",
               "--out", out)
    assert r.rc == 2 and "use --placement looped" in r.err


def test_plan_draws_the_simulated_timeline_and_a_runs_real_one(tmp_path) -> None:
    """`hvdtrain plan --schedule zbv -m 4` draws the simulator's timeline; `--trace FILE` the order that
    ran, which is the plan's."""
    r = run([HVDTRAIN, "plan", "-np", "2", "--stages", "2", "--stages-per-rank", "2", "--schedule", "zbv",
             "-m", "4"])
    assert r.rc == 0, r.err[-3000:]
    rows = [line for line in r.out.splitlines() if line.startswith("position ")]
    assert len(rows) == 2 and "25 ticks (unit costs); bubble 2/50" in r.out
    batched = run([HVDTRAIN, "plan", "-np", "2", "--stages", "2", "--schedule", "zb1", "-m", "4"])
    assert batched.rc == 0, batched.err[-3000:]  # zb1 batches every W of the step by default
    assert "0B3 0W0-3     ~     ~     ~" in batched.out and "peak activations (stage-microbatches held): " \
        "position 0 4, position 1 4" in batched.out
    trace = str(tmp_path / "trace.json")
    r = mpirun(2, *MLP, *V, "--stages", "2", "--schedule", "zbv", "--trace", trace, "--out",
               str(tmp_path / "run"))
    assert r.rc == 0, r.err[-3000:]
    got = run([HVDTRAIN, "plan", "-np", "1", "--trace", trace])
    assert got.rc == 0, got.err[-3000:]
    ran = [line.split(": ", 1)[1] for line in got.out.splitlines() if line.startswith("rank ")]
    assert ran == [" ".join(a for a in row.split(": ", 1)[1].split() if a not in ".~") for row in rows]
    bad = run([HVDTRAIN, "plan", "-np", "1", "--trace", str(tmp_path / "run" / "config.json")])
    assert bad.rc == 2 and bad.err.count("\n") == 1
