"""GROVER's labelled data: label columns read and checked, the split, and predictions written."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import numpy as np

from ...training.data import DataError

__all__ = ["check_labels", "column", "floats", "load_labelled", "write_predictions"]


def column(spec: Optional[str]) -> str | int | None:
    """A column given as a name or a 0-based index (``None``: the default)."""
    if spec is None:
        return None
    return int(spec) if spec.strip().lstrip("-").isdigit() else spec.strip()


def floats(text: str, what: str, n: int) -> tuple[float, ...]:
    """``n`` comma-separated numbers of option ``what``."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise DataError(f"{what} {text!r}: write {n} comma-separated numbers, e.g. 0.8,0.1,0.1") from None
    if len(vals) != n:
        raise DataError(f"{what} {text!r}: write {n} comma-separated numbers, e.g. 0.8,0.1,0.1")
    return vals


def check_labels(table: Any, path: str, classification: bool) -> None:
    """Every label column holds a label somewhere; classification labels are 0 or 1."""
    assert table.labels is not None
    for j, name in enumerate(table.label_names):
        col = table.labels[:, j]
        if np.isnan(col).all():
            raise DataError(f"{path}: label column {name!r} is empty in every row; pass a column "
                            "that holds the labels with --label-cols")
        if classification:
            bad = np.flatnonzero(~np.isnan(col) & (col != 0) & (col != 1))
            if bad.size:
                i = int(bad[0])
                raise DataError(f"{path}:{table.lines[i]}: column {name!r} holds {col[i]:g}; classification "
                                "labels are 0 or 1 (empty: missing); use --task regression for values")


def load_labelled(data: Optional[str], label_cols: Optional[str], smiles_col: Optional[str],
                  classification: bool, split: str, split_sizes: str, split_seed: int,
                  say: Callable[[str], None] = lambda msg: None,
                  ) -> tuple[Any, str, tuple[list[int], list[int], list[int]]]:
    """The labelled molecules (``--data`` or CHEMBL2321810), checked, and their train/val/test split.

    ``say`` hears about rows skipped. Returns:
        (MolTable, the name to report it by, (train, val, test) row indices).
    """
    from .molfiles import b3db, chembl2321810, random_split, read_smiles_csv, scaffold_split

    fractions = floats(split_sizes, "--split-sizes", 3)
    builtin = {"chembl2321810": chembl2321810, "b3db": b3db}
    if data in builtin and not os.path.exists(data):
        if label_cols or smiles_col:
            raise DataError(f"--data {data} is a built-in set with its own columns: drop --label-cols and "
                            "--smiles-col")
        if data == "b3db" and not classification:
            raise DataError("--data b3db holds 0/1 labels (BBB+ is 1): use --task classification")
        table, path = builtin[data](), data.upper() if data != "b3db" else "B3DB"
    elif data:
        if not label_cols:
            raise DataError("--data needs --label-cols: the label columns, names or 0-based "
                            "indices, comma-separated")
        cols = [column(x) for x in label_cols.split(",")]
        table = read_smiles_csv(data, column(smiles_col), [x for x in cols if x is not None])
        path = data
    else:
        if label_cols or smiles_col:
            raise DataError("--label-cols and --smiles-col choose columns of --data; give --data too")
        table, path = chembl2321810(), "CHEMBL2321810"
    if table.skipped:
        say(f"{path}: {table.report()}")
    check_labels(table, path, classification)
    parts = (scaffold_split(table.smiles, fractions, split_seed) if split == "scaffold"
             else random_split(len(table), fractions, split_seed))
    for part, idx in zip(("training", "validation", "test"), parts):
        if not idx:
            raise DataError(f"the {split} split of {len(table)} molecules leaves the {part} set "
                            f"empty; use more molecules or other --split-sizes")
    return table, path, parts


def write_predictions(path: str, smiles: list[str], names: list[str], y: np.ndarray, p: np.ndarray) -> None:
    """A CSV of each molecule, its labels (empty: missing) and the predictions."""
    import csv

    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["smiles", *names, *(f"predicted_{n}" for n in names)])
        for i, s in enumerate(smiles):
            out.writerow([s, *("" if np.isnan(v) else f"{v:.6g}" for v in y[i]),
                          *(f"{v:.6g}" for v in p[i])])
