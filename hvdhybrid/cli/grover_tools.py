"""``hvdtrain grover baseline`` (a random forest on fingerprints) and ``grover configs`` (the named sizes)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Optional

import click
import numpy as np

from ..errors import USER_ERRORS
from ..models.grover.config import CONFIGS
from ..models.grover.labels import load_labelled
from ..training.data import DataError
from .grover_options import data_options, say

__all__ = ["baseline", "configs"]


# --------------------------------------------------------------------------- baseline
@click.command()
@click.option("--smiles-col", default=None, help="SMILES column: a name or a 0-based index.")
@data_options
@click.option("--trees", type=int, default=500, show_default=True)
@click.option("--radius", type=int, default=2, show_default=True, help="Morgan fingerprint radius.")
@click.option("--bits", type=int, default=2048, show_default=True, help="Fingerprint length.")
@click.option("--seed", type=int, default=0, show_default=True)
def baseline(smiles_col: Optional[str], data: Optional[str], label_cols: Optional[str], task: str,
             split: str, split_sizes: str, split_seed: int, trees: int, radius: int, bits: int,
             seed: int) -> None:
    """Reference: a random forest on Morgan fingerprints, same data, split and metric as finetune.

    One process (no MPI needed); prints the validation and test metric as JSON.
    """
    import json

    from ..errors import UserError
    from ..models.grover.baseline import fingerprints, forest_predict
    from ..training.metrics import rmse, roc_auc

    classification = task == "classification"
    try:
        if trees < 1 or radius < 0 or bits < 8:
            raise DataError(f"--trees must be >= 1, --radius >= 0 and --bits >= 8; got {trees}, "
                            f"{radius}, {bits}")
        table, path, parts = load_labelled(data, label_cols, smiles_col, classification, split,
                                           split_sizes, split_seed, say)
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    assert table.labels is not None
    x = fingerprints(table.mols, radius, bits)
    y = table.labels.astype(np.float64)
    train, val, test = parts
    result: dict[str, Any] = {"model": "random-forest-morgan", "data": path, "split": split,
                              "sizes": [len(p) for p in parts], "trees": trees, "radius": radius,
                              "bits": bits, "seed": seed}
    metric = roc_auc if classification else rmse
    key = "roc_auc" if classification else "rmse"
    pred = forest_predict(x[train], y[train], x[val + test], classification, trees, seed)
    result[f"val_{key}"] = metric(pred[:len(val)], y[val])
    result[f"test_{key}"] = metric(pred[len(val):], y[test])
    if not classification:  # the floor any model must beat: predict the training molecules' mean
        mean = np.nanmean(y[train], axis=0, keepdims=True)
        result["train_mean_val_rmse"] = rmse(np.repeat(mean, len(val), 0), y[val])
        result["train_mean_test_rmse"] = rmse(np.repeat(mean, len(test), 0), y[test])
    click.echo(json.dumps(result))


# --------------------------------------------------------------------------- configs
@click.command()
@click.option("--tasks", type=int, default=1, show_default=True, help="Finetuning outputs per head.")
def configs(tasks: int) -> None:
    """The named model sizes and their parameter counts (with finetuning heads)."""
    import torch

    from ..errors import UserError

    if tasks < 1:
        raise UserError(f"--tasks must be >= 1, got {tasks}")
    from ..models.grover.model import count_parameters
    from ..models.grover.staged import FinetuneHeads, GroverNet

    click.echo(f"{'config':<7} {'hidden':>6} {'heads':>5} {'layers':>6} {'hops':>4} {'ffn':>5} "
               f"{'dropout':>7} {'parameters':>12}")
    for name, cfg in CONFIGS.items():
        with torch.device("meta"):  # shapes only: no memory, no time
            n = count_parameters(GroverNet(cfg, FinetuneHeads(cfg, tasks)))
        d = asdict(cfg)
        click.echo(f"{name:<7} {d['hidden']:>6} {d['heads']:>5} {d['layers']:>6} {d['hops']:>4} "
                   f"{d['ffn']:>5} {d['dropout']:>7} {n:>12,}")

