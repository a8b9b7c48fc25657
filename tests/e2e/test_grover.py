"""`hvdtrain grover ...` for real: pretrain -> finetune hand-off, layouts, classification, reports."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch
from conftest import HVDTRAIN, mpirun, run

from hvdhybrid.models.grover.features import N_DESCRIPTORS

TINY = ["--config", "tiny", "--no-progress", "--seed", "1"]
SMILES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN(CC)CC", "c1ccncc1", "OC(=O)c1ccccc1", "CC(C)Cl", "C1CCCCC1",
          "CCOC(=O)C", "NCCO", "c1ccc2ccccc2c1", "CC#N", "O=C1CCCC1", "CS(=O)(=O)N", "FC(F)(F)c1ccccc1",
          "CCCCCCO", "CCCl", "OCCO", "c1ccoc1", "CC(N)C(=O)O"]


def labelled_csv(path: str, bad_line: bool = True) -> str:
    """40 molecules with a 0/1 label; line 5 holds a SMILES that does not parse."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "smiles", "active"])
        rows = [(f"m{i}", s, int("O" in s)) for i, s in enumerate(SMILES * 2)]
        for i, row in enumerate(rows):
            if bad_line and i == 3:
                w.writerow(["broken", "C1CC(", 1])
            w.writerow(row)
    return path


def summary(out: str) -> dict[str, float]:
    return json.load(open(os.path.join(out, "summary.json")))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Pretraining on the shipped molecules (first 96), task parallel x 2 pipeline stages on 4 ranks."""
    out = str(tmp_path_factory.mktemp("pre") / "run")
    r = mpirun(4, "grover", "pretrain", *TINY, "--max-molecules", "96", "--task-parallel", "--stages", "2",
               "--steps", "3", "--batch-size", "16", "--out", out)
    assert r.rc == 0, r.err[-3000:]
    assert "GROVER tiny: hidden 32" in r.err and "parameters" in r.err
    assert "1 bundle(s) x stages of width 1,1,1,1" in r.err
    return out


def test_pretrain_writes_the_encoder_and_a_validation_loss(pretrained: str) -> None:
    s = summary(pretrained)
    assert s["steps"] == 3 and math.isfinite(s["val_loss"]) and s["val_rows"] > 0
    state = torch.load(os.path.join(pretrained, "grover.pt"), weights_only=True)
    assert state["steps"] == 3 and state["molecules"] == 91  # 96 minus 5% validation
    assert any(k.startswith("edge_blocks.") for k in state["params"])


def test_finetune_from_checkpoint_with_bundles_and_descriptors(pretrained: str, tmp_path) -> None:
    out = str(tmp_path / "ft")
    r = mpirun(4, "grover", "finetune", "--checkpoint", pretrained, "--task-parallel", "--steps", "3",
               "--batch-size", "16", "--no-progress", "--rdkit-2d", "--out", out)
    assert r.rc == 0, r.err[-3000:]
    assert "2 bundle(s) x stages of width 1,1" in r.err
    assert f"encoder (88 tensors) from {pretrained}, pretrained 3 steps" in r.err
    assert f"heads also read {N_DESCRIPTORS} RDKit 2D descriptors" in r.err
    s = summary(out)
    assert math.isfinite(s["val_rmse"]) and math.isfinite(s["test_rmse"])
    with open(os.path.join(out, "predictions_test.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == s["test_rows"] and {"smiles", "Act", "predicted_Act"} <= set(rows[0])
    # the reported RMSE is the one of the written predictions, in pIC50 units
    err = [(float(x["Act"]) - float(x["predicted_Act"])) ** 2 for x in rows]
    assert math.sqrt(sum(err) / len(err)) == pytest.approx(s["test_rmse"], rel=1e-4)


def test_finetune_layouts_end_with_the_parameters_of_one_process(tmp_path) -> None:
    """The CLI path (reading, splitting, standardising, lazy featurisation) is transparent too.

    With SGD: Adam divides by sqrt(v) + 1e-8, which turns the float noise of a
    gradient that is zero in exact arithmetic (e.g. the key part of the
    attention's packed bias: softmax ignores it) into a step of size lr.
    """
    args = ["grover", "finetune", *TINY, "--steps", "3", "--batch-size", "8", "--optimizer", "sgd",
            "--no-fp16-compression", "--save-params", "-m", "2"]
    one = mpirun(1, *args, "--out", str(tmp_path / "one"))
    assert one.rc == 0, one.err[-3000:]
    tp_pp = mpirun(4, *args, "--task-parallel", "--stages", "2", "--out", str(tmp_path / "tp_pp"))
    assert tp_pp.rc == 0, tp_pp.err[-3000:]
    a = torch.load(str(tmp_path / "one" / "params.pt"))
    b = torch.load(str(tmp_path / "tp_pp" / "params.pt"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert summary(str(tmp_path / "one"))["test_rmse"] == pytest.approx(
        summary(str(tmp_path / "tp_pp"))["test_rmse"], rel=1e-4)


def test_classification_skips_and_reports_unparsable_smiles(tmp_path) -> None:
    data = labelled_csv(str(tmp_path / "mols.csv"))
    out = str(tmp_path / "cls")
    r = mpirun(2, "grover", "finetune", *TINY, "--data", data, "--label-cols", "active", "--task",
               "classification", "--split", "random", "--steps", "4", "--batch-size", "8", "--out", out)
    assert r.rc == 0, r.err[-3000:]
    assert "skipped 1 unparsable SMILES (line 5)" in r.err
    assert "40 molecules with 1 label(s)" in r.err
    s = summary(out)
    auc = s["test_roc_auc"]
    assert math.isnan(auc) or 0.0 <= auc <= 1.0
    assert s["val_rows"] + s["test_rows"] == 8


def test_baseline_reports_val_and_test(tmp_path) -> None:
    data = labelled_csv(str(tmp_path / "mols.csv"), bad_line=False)
    r = run([HVDTRAIN, "grover", "baseline", "--data", data, "--label-cols", "active", "--task",
             "classification", "--split", "random", "--trees", "20"])
    assert r.rc == 0, r.err[-2000:]
    res = json.loads(r.out.strip().splitlines()[-1])
    assert res["sizes"] == [32, 4, 4] and "test_roc_auc" in res and "val_roc_auc" in res


def test_baseline_regression_reports_the_training_mean_floor(tmp_path) -> None:
    """The RMSE of predicting the training mean: the floor any model's RMSE is read against."""
    from hvdhybrid.models.grover.molfiles import random_split

    path = str(tmp_path / "reg.csv")
    ys = [float(len(s)) for s in SMILES * 2]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["smiles", "y"])
        w.writerows(zip(SMILES * 2, ys))
    r = run([HVDTRAIN, "grover", "baseline", "--data", path, "--label-cols", "y", "--split", "random",
             "--trees", "20"])
    assert r.rc == 0, r.err[-2000:]
    res = json.loads(r.out.strip().splitlines()[-1])
    train, val, test = random_split(len(ys), (0.8, 0.1, 0.1), 0)
    mean = sum(ys[i] for i in train) / len(train)
    for part, idx in (("val", val), ("test", test)):
        want = math.sqrt(sum((ys[i] - mean) ** 2 for i in idx) / len(idx))
        assert res[f"train_mean_{part}_rmse"] == pytest.approx(want, rel=1e-6)
    assert res["test_rmse"] < res["train_mean_test_rmse"]  # the forest learns the SMILES length


def test_a_frozen_encoder_stays_as_pretrained_at_every_layout(pretrained: str, tmp_path) -> None:
    """--freeze-encoder: only readout and heads train; stages with nothing to train still run."""
    args = ["grover", "finetune", "--checkpoint", pretrained, "--freeze-encoder", "--steps", "3",
            "--batch-size", "8", "--optimizer", "sgd", "--no-fp16-compression", "--save-params",
            "--no-progress", "-m", "2"]
    one = mpirun(1, *args, "--out", str(tmp_path / "one"))
    assert one.rc == 0, one.err[-3000:]
    assert "frozen (" in one.err and "parameters not trained)" in one.err
    a = torch.load(str(tmp_path / "one" / "params.pt"))
    # task x pipeline; and 2 bundles x 2 stages under --zero 1, where stage 0 has nothing to train
    layouts = [("four", ["--task-parallel", "--stages", "2"]), ("zero", ["--stages", "2", "--zero", "1"])]
    for name, layout in layouts:
        four = mpirun(4, *args, *layout, "--out", str(tmp_path / name))
        assert four.rc == 0, four.err[-3000:]
        b = torch.load(str(tmp_path / name / "params.pt"))
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5, layout
    encoder = torch.load(os.path.join(pretrained, "grover.pt"), weights_only=True)["params"]
    assert all(torch.equal(a[k], encoder[k]) for k in encoder)
    unfrozen = mpirun(1, *args[:4], *args[5:], "--out", str(tmp_path / "free"))
    assert unfrozen.rc == 0, unfrozen.err[-3000:]
    c = torch.load(str(tmp_path / "free" / "params.pt"))
    assert any(not torch.equal(c[k], encoder[k]) for k in encoder)  # without the flag the encoder moves


def test_b3db_is_a_built_in_classification_set(tmp_path) -> None:
    out = str(tmp_path / "b3db")
    r = mpirun(2, "grover", "finetune", *TINY, "--data", "b3db", "--task", "classification", "--steps", "2",
               "--batch-size", "16", "--out", out)
    assert r.rc == 0, r.err[-3000:]
    assert "7805 molecules with 1 label(s) from B3DB; scaffold split" in r.err
    assert 0.0 <= summary(out)["test_roc_auc"] <= 1.0
    ft = ["grover", "finetune", *TINY, "--steps", "1"]
    bad = mpirun(1, *ft, "--data", "b3db", "--out", str(tmp_path / "x"))
    assert bad.rc == 2 and "--data b3db holds 0/1 labels (BBB+ is 1): use --task classification" in bad.err
    bad = mpirun(1, *ft, "--freeze-encoder", "--out", str(tmp_path / "y"))
    assert bad.rc == 2
    assert "--freeze-encoder keeps a pretrained encoder as it is: give --checkpoint" in bad.err
