"""GROVER command pieces that need no MPI: metrics, the pretrained hand-off, layouts, labels, baseline."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from rdkit import Chem

from hvdhybrid.cli.grover_options import grover_widths
from hvdhybrid.cli.main import cli
from hvdhybrid.config import Config, ParallelConfig
from hvdhybrid.layout.topology import LayoutError
from hvdhybrid.models.grover.baseline import fingerprints, forest_predict
from hvdhybrid.models.grover.config import CONFIGS
from hvdhybrid.models.grover.data import FinetuneSet
from hvdhybrid.models.grover.labels import check_labels as _check_labels
from hvdhybrid.models.grover.labels import floats as _floats
from hvdhybrid.models.grover.labels import load_labelled
from hvdhybrid.models.grover.molfiles import read_smiles_csv
from hvdhybrid.models.grover.pretrained import (
    check_config,
    config_from,
    load_encoder,
    load_pretrained,
    save_pretrained,
)
from hvdhybrid.models.grover.staged import FinetuneHeads, GroverNet, PretrainHeads
from hvdhybrid.parallel.partition import PartitionError
from hvdhybrid.training.data import DataError
from hvdhybrid.training.metrics import rmse, roc_auc

TINY = CONFIGS["tiny"]


# ---------------------------------------------------------------- metrics
def test_rmse_ignores_missing_labels() -> None:
    y = np.array([[1.0, np.nan], [3.0, 2.0]])
    p = np.array([[2.0, 100.0], [3.0, 4.0]])
    assert rmse(p, y) == pytest.approx(math.sqrt((1 + 0 + 4) / 3))
    assert math.isnan(rmse(p, np.full_like(y, np.nan)))


def test_roc_auc_averages_tasks_with_both_classes() -> None:
    y = np.array([[0, 1], [1, 1], [0, 1], [1, np.nan]], dtype=float)
    s = np.array([[0.1, 0.5], [0.9, 0.2], [0.2, 0.3], [0.3, 0.0]])
    # task 0: positives score 0.9, 0.3; negatives 0.1, 0.2 -> perfect; task 1 has one class: left out
    assert roc_auc(s, y) == 1.0
    assert roc_auc(1 - s, y) == 0.0
    assert math.isnan(roc_auc(s[:, 1:], y[:, 1:]))


# ---------------------------------------------------------------- the pretrained hand-off
def test_pretrained_encoder_round_trips_and_heads_stay_new(tmp_path: Path) -> None:
    torch.manual_seed(1)
    pre = GroverNet(TINY, PretrainHeads(TINY, 7, 9, 85))
    params = {k: v.detach().clone() for k, v in pre.named_parameters()}
    path = str(tmp_path / "grover.pt")
    save_pretrained(path, "tiny", TINY, params, "{}", "{}", steps=5, molecules=10)
    state = load_pretrained(str(tmp_path))  # the run directory works too
    assert config_from(state) == TINY and state["steps"] == 5
    torch.manual_seed(2)
    net = GroverNet(TINY, FinetuneHeads(TINY, 1))
    heads_before = {k: v.clone() for k, v in net.heads.state_dict().items()}
    n = load_encoder(net, state)
    assert n > 0 and not any(k.startswith("heads.") for k in state["params"])
    for k, v in net.state_dict().items():
        if k.startswith("heads."):
            assert torch.equal(v, heads_before[k[len("heads."):]])
        else:
            assert torch.equal(v, params[k]), k


def test_pretrained_errors_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no grover.pt"):
        load_pretrained(str(tmp_path))
    with pytest.raises(DataError, match="no such file"):
        load_pretrained(str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot be read"):
        load_pretrained(str(junk))
    other = tmp_path / "other.pt"
    torch.save({"format": "something else"}, other)
    with pytest.raises(DataError, match="not a GROVER pretraining file"):
        load_pretrained(str(other))


def test_config_mismatch_names_the_fields(tmp_path: Path) -> None:
    net = GroverNet(TINY, PretrainHeads(TINY, 3, 3, 85))
    save_pretrained(str(tmp_path / "g.pt"), "tiny", TINY, dict(net.named_parameters()), "{}", "{}", 1, 1)
    state = load_pretrained(str(tmp_path / "g.pt"))
    check_config(state, replace(TINY, dropout=0.3), "g.pt")  # dropout may differ
    with pytest.raises(DataError, match="layers 2 \\(asked: 4\\)"):
        check_config(state, replace(TINY, layers=4), "g.pt")


# ---------------------------------------------------------------- layouts
def common(**kw: object) -> ParallelConfig:
    base = dict(stages=None, bundle_shape=None, stages_per_rank=1, placement="looped",
                microbatches=1, schedule="1f1b", fp16_compression=True, accumulate=1,
                steps=1, batch_size=8, lr=0.1, seed=0, out=None, device="cpu", partition="params",
                threads=1, save_params=False, progress=False, checkpoint_every=0, keep=1, resume=False,
                timeout=10.0, clip_grad=0.0, warmup=0, lr_schedule="constant")
    base.update(kw)
    return Config.from_flat(**base).parallel


def test_grover_widths() -> None:
    assert grover_widths(common(), False, TINY) == (1,)
    assert grover_widths(common(), True, TINY) == (1, 1)
    assert grover_widths(common(stages=2), True, TINY) == (1, 1, 1, 1)
    with pytest.raises(PartitionError, match="--layers 3"):
        grover_widths(common(stages=3), False, TINY)
    with pytest.raises(LayoutError, match="not --bundle-shape"):
        grover_widths(common(bundle_shape="2,1"), False, TINY)
    with pytest.raises(LayoutError, match=">= 1"):
        grover_widths(common(stages=0), False, TINY)


# ---------------------------------------------------------------- labels and splits
def write(tmp_path: Path, text: str, name: str = "d.csv") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_labels_checked_with_file_line_and_column(tmp_path: Path) -> None:
    p = write(tmp_path, "smiles,y,empty\nCCO,1,\nc1ccccc1,2,\nCC,0,\n")
    t = read_smiles_csv(p, None, ["y", "empty"])
    with pytest.raises(DataError, match="'empty' is empty in every row"):
        _check_labels(t, p, False)
    t = read_smiles_csv(p, None, ["y"])
    _check_labels(t, p, False)
    with pytest.raises(DataError, match=r"d.csv:3: column 'y' holds 2; classification labels are 0 or 1"):
        _check_labels(t, p, True)


def test_load_labelled_defaults_and_errors(tmp_path: Path) -> None:
    table, name, (tr, va, te) = load_labelled(None, None, None, False, "scaffold", "0.8,0.1,0.1", 0)
    assert name == "CHEMBL2321810" and len(table) == len(tr) + len(va) + len(te) > 1000
    with pytest.raises(DataError, match="--data needs --label-cols"):
        load_labelled(write(tmp_path, "smiles,y\nCC,1\n"), None, None, False, "random", "0.8,0.1,0.1", 0)
    with pytest.raises(DataError, match="give --data too"):
        load_labelled(None, "y", None, False, "random", "0.8,0.1,0.1", 0)
    with pytest.raises(DataError, match="leaves the validation set empty"):
        load_labelled(write(tmp_path, "smiles,y\nCC,1\nCCC,2\n"), "y", None, False, "random", "1,0,0", 0)
    with pytest.raises(DataError, match="3 comma-separated numbers"):
        _floats("0.8,0.2", "--split-sizes", 3)


def test_finetune_set_standardises_only_regression() -> None:
    mols = [Chem.MolFromSmiles(s) for s in ("CC", "CCO", "CCN")]
    reg = FinetuneSet(mols, np.array([1.0, 2.0, 3.0]))
    assert float(reg.y.mean()) == pytest.approx(0.0, abs=1e-6)
    test = FinetuneSet(mols[:1], np.array([5.0]), reg.mean, reg.std)
    assert float(test.y[0, 0]) == pytest.approx((5.0 - 2.0) / reg.std[0], rel=1e-5)
    cls = FinetuneSet(mols, np.array([0.0, 1.0, np.nan]), standardize=False)
    assert cls.y[:2, 0].tolist() == [0.0, 1.0] and math.isnan(float(cls.y[2, 0]))


# ---------------------------------------------------------------- baseline and configs
def test_forest_on_fingerprints_learns_a_simple_property() -> None:
    smiles = ["C" * n + "O" * k for n in range(1, 9) for k in range(0, 3)]
    mols = [Chem.MolFromSmiles(s) for s in smiles]
    x = fingerprints(mols, 2, 256)
    assert x.shape == (len(mols), 256) and set(np.unique(x)) <= {0, 1}
    y = np.array([[float("O" in s)] for s in smiles])
    p = forest_predict(x[::2], y[::2], x[1::2], True, trees=20)
    assert roc_auc(p, y[1::2]) > 0.9
    r = forest_predict(x[::2], np.array([[s.count("C")] for s in smiles[::2]], float), x[1::2], False, 50)
    assert rmse(r, np.array([[s.count("C")] for s in smiles[1::2]], float)) < 2.0


def test_configs_lists_parameter_counts() -> None:
    res = CliRunner().invoke(cli, ["grover", "configs"])
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: int(line.split()[-1].replace(",", "")) for line in res.output.splitlines()[1:]}
    assert set(rows) == set(CONFIGS)
    assert rows["tiny"] == sum(p.numel() for p in GroverNet(TINY, FinetuneHeads(TINY, 1)).parameters())
    assert 45e6 < rows["base"] < 52e6 and 95e6 < rows["large"] < 115e6  # the paper: 48M and 100M
    assert CliRunner().invoke(cli, ["grover", "configs", "--tasks", "0"]).exit_code == 2


def test_grover_help_lists_the_subcommands() -> None:
    res = CliRunner().invoke(cli, ["grover", "--help"])
    assert res.exit_code == 0
    for sub in ("pretrain", "finetune", "baseline", "configs"):
        assert sub in res.output


def test_heads_read_the_molecule_features_of_the_batch() -> None:
    """--rdkit-2d: the features reach both heads, row by row, and a missing one is a clear error."""
    cfg = CONFIGS["tiny"]
    mols = [Chem.MolFromSmiles(s) for s in ("CCO", "c1ccccc1", "CC(=O)O")]
    feats = np.arange(9.0).reshape(3, 3) / 10
    ds = FinetuneSet(mols, np.zeros((3, 1)), features=feats)
    torch.manual_seed(0)
    net = GroverNet(cfg, FinetuneHeads(cfg, 1, extra=3))
    g, _ = ds.batch([2, 0])
    assert g.mol_features is not None and torch.equal(
        g.mol_features, torch.tensor(feats[[2, 0]], dtype=torch.float32))
    a = net(g)
    g.mol_features = g.mol_features + 1.0  # other features, other predictions
    b = net(g)
    assert all(not torch.allclose(x, y) for x, y in zip(a, b))
    g.mol_features = None
    with pytest.raises(ValueError, match="needs 3 features per molecule, got none"):
        net(g)
    with pytest.raises(ValueError, match="2 feature rows for 3 molecules"):
        FinetuneSet(mols, np.zeros((3, 1)), features=feats[:2])
