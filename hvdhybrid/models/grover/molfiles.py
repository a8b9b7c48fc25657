"""GROVER's molecule files and splits: SMILES files read and checked, RDKit's bundled sets, scaffold split."""

from __future__ import annotations

import math
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import rdkit
from rdkit import Chem
from rdkit.Chem.Scaffolds import MurckoScaffold
from rdkit.rdBase import BlockLogs

from hvdhybrid.training.data import DataError, read_csv_rows, read_text

__all__ = ["MolTable", "read_smiles_csv", "b3db", "chembl2321810", "default_pretrain_smiles",
           "scaffold_split", "random_split"]


@dataclass
class MolTable:
    """Parsed molecules of a SMILES file; ``skipped`` holds the 1-based lines whose SMILES did not parse."""

    smiles: list[str]
    mols: list[Chem.Mol]
    labels: Optional[np.ndarray] = None  # [n, n_tasks] float32, NaN where a label is missing
    skipped: list[int] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # the 1-based file line of each molecule

    def __len__(self) -> int:
        return len(self.smiles)

    def report(self) -> str:
        lines = ", ".join(str(i) for i in self.skipped[:20]) + (", ..." if len(self.skipped) > 20 else "")
        n = len(self.skipped)
        return f"skipped {n} unparsable SMILES" + (f" (line{'s' if n > 1 else ''} {lines})" if n else "")


Rows = list[tuple[int, list[str]]]


def _read_rows(path: str) -> tuple[Rows, bool]:
    """(1-based line, cells) of every non-blank row, and whether the file is CSV (a .csv file, or not
    a .smi file and its first line has a comma); other files are split on whitespace."""
    what = "a CSV or .smi file of SMILES"
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; pass the path of {what}")
    text = read_text(path, what)
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    is_csv = path.lower().endswith(".csv") or (not path.lower().endswith(".smi") and "," in first)
    if is_csv:
        return read_csv_rows(path, what), True
    rows: Rows = [(i, ln.split()) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    if not rows:
        raise DataError(f"{path}: the file is empty; pass a file with one SMILES per line")
    return rows, False


def _parse(smiles: str) -> Optional[Chem.Mol]:
    with BlockLogs():
        return Chem.MolFromSmiles(smiles) if smiles else None


def _column(path: str, spec: str | int, header: Optional[list[str]], role: str) -> int:
    if isinstance(spec, int):
        if spec < 0:
            raise DataError(f"{path}: {role} column index {spec} is negative; columns count from 0")
        return spec
    if header is None or spec not in header:
        there = ", ".join(repr(c) for c in header) if header else "none (the file has no header line)"
        raise DataError(f"{path}:1: no {role} column {spec!r}; the columns are {there}: pass one of them")
    return header.index(spec)


def _label(path: str, line: int, cells: list[str], col: int, name: str) -> float:
    if col >= len(cells):
        raise DataError(f"{path}:{line}: column {col + 1} ({name!r}) is missing: the row has {len(cells)} "
                        "cells; give every row the same columns (an empty cell is a missing label)")
    text = cells[col]
    try:
        return float(text) if text else math.nan
    except ValueError:
        raise DataError(f"{path}:{line}: column {col + 1} ({name!r}) holds {text!r}, not a number; "
                        "write a number or leave the cell empty for a missing label") from None


def _table(path: str, items: list[tuple[int, str, list[float]]],
           label_names: Optional[list[str]]) -> MolTable:
    t = MolTable([], [], skipped=[], label_names=list(label_names or []))
    labels: list[list[float]] = []
    for line, smi, lab in items:
        mol = _parse(smi)
        if mol is None:
            t.skipped.append(line)
            continue
        t.smiles.append(smi)
        t.mols.append(mol)
        t.lines.append(line)
        labels.append(lab)
    if not t.smiles:
        what = "none of its SMILES could be parsed" if items else "it holds no data rows"
        raise DataError(f"{path}: {what}; check the file, or pick the SMILES column with --smiles-col")
    if label_names is not None:
        t.labels = np.asarray(labels, dtype=np.float32).reshape(len(labels), len(label_names))
    return t


def read_smiles_csv(path: str, smiles_col: str | int | None = None,
                    label_cols: Optional[Sequence[str | int]] = None) -> MolTable:
    """Molecules (and float labels) from a CSV or a whitespace-separated .smi file.

    Columns are names (the file then needs a header) or 0-based indices. A header is assumed when a
    column is named, a first-row cell contains 'smiles', or (CSV) no first-row cell parses as SMILES.
    The SMILES column defaults to the first with 'smiles' in its name, else the first column.
    """
    rows, is_csv = _read_rows(path)
    first = rows[0][1]
    named = isinstance(smiles_col, str) or any(isinstance(c, str) for c in (label_cols or []))
    has_header = named or any("smiles" in c.lower() for c in first) or (
        is_csv and not any(_parse(c) is not None for c in first))
    header = first if has_header else None
    data = rows[1:] if has_header else rows
    if smiles_col is None:
        smiles_col = next((i for i, c in enumerate(header or []) if "smiles" in c.lower()), 0)
    scol = _column(path, smiles_col, header, "SMILES")
    lcols = [_column(path, c, header, "label") for c in label_cols or []]
    names = [header[c] if header and c < len(header) else f"column {c + 1}" for c in lcols]
    items = []
    for line, cells in data:
        if scol >= len(cells):
            raise DataError(f"{path}:{line}: no SMILES in column {scol + 1}: the row has {len(cells)} cells; "
                            "give every row the same columns")
        items.append((line, cells[scol], [_label(path, line, cells, c, n) for c, n in zip(lcols, names)]))
    return _table(path, items, names if label_cols is not None else None)


def _rdkit_file(*parts: str) -> str:
    return os.path.join(os.path.dirname(rdkit.__file__), *parts)


def chembl2321810() -> MolTable:
    """RDKit's FreeWilson CHEMBL2321810 set: SMILES joined by id with their pIC50 ('Act') as the label."""
    smi_path = _rdkit_file("Contrib", "FreeWilson", "data", "CHEMBL2321810.smi")
    act_path = _rdkit_file("Contrib", "FreeWilson", "data", "CHEMBL2321810_act.csv")
    act_rows = _read_rows(act_path)[0]
    header = act_rows[0][1]
    name_col, act_col = _column(act_path, "Name", header, "id"), _column(act_path, "Act", header, "label")
    act = {cells[name_col]: _label(act_path, line, cells, act_col, "Act") for line, cells in act_rows[1:]}
    items = [(line, cells[0], [act[cells[1]]]) for line, cells in _read_rows(smi_path)[0]
             if len(cells) > 1 and cells[1] in act]
    return _table(smi_path, items, ["Act"])


def b3db() -> MolTable:
    """B3DB's blood-brain-barrier classification set (PyPI ``qc-b3db``): label 1 for BBB+, 0 for BBB-."""
    import csv
    import importlib.util

    spec = importlib.util.find_spec("B3DB")
    path = os.path.join(list(spec.submodule_search_locations or [""])[0], "B3DB_classification.tsv") \
        if spec is not None else ""
    if not os.path.isfile(path):
        raise DataError("--data b3db needs the qc-b3db package: pip install --no-deps qc-b3db==1.1.1 "
                        "(bin/setup does)")
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    col, lab = rows[0].index("SMILES"), rows[0].index("BBB+/BBB-")
    items = [(line, cells[col], [1.0 if cells[lab] == "BBB+" else 0.0])
             for line, cells in enumerate(rows[1:], 2) if cells and cells[lab] in ("BBB+", "BBB-")]
    return _table(path, items, ["BBB+"])


def default_pretrain_smiles() -> list[str]:
    """Unlabelled SMILES for pre-training: RDKit's WEHI PAINS test set and the first 5K NCI molecules."""
    wehi = read_smiles_csv(_rdkit_file("Data", "Pains", "test_data", "wehi_mols.csv"), smiles_col=0)
    nci = read_smiles_csv(_rdkit_file("Data", "NCI", "first_5K.smi"), smiles_col=0)
    return wehi.smiles + nci.smiles


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"split fractions {tuple(fractions)} must be 3 non-negative numbers summing to 1")


def scaffold_split(smiles: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                   seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Balanced Bemis-Murcko scaffold split: no scaffold is in two splits.

    Scaffold sets larger than half the validation or test size go to train first (largest first);
    the others follow in an order shuffled by ``seed``. Each set fills train, then val, then test.
    """
    _check_fractions(fractions)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, smi in enumerate(smiles):
        mol = _parse(smi)
        if mol is None:
            raise DataError(f"SMILES {i} ({smi!r}) cannot be parsed; drop it first (read_smiles_csv does)")
        groups[MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False)].append(i)
    n = len(smiles)
    n_train, n_val = int(fractions[0] * n), int(fractions[1] * n)
    n_test = n - n_train - n_val
    sets = [groups[k] for k in sorted(groups)]
    is_big = [len(s) > n_val / 2 or len(s) > n_test / 2 for s in sets]
    big = sorted((s for s, b in zip(sets, is_big) if b), key=lambda s: (-len(s), s[0]))
    small = [s for s, b in zip(sets, is_big) if not b]
    random.Random(seed).shuffle(small)
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for s in big + small:
        if len(train) + len(s) <= n_train:
            train += s
        elif len(val) + len(s) <= n_val:
            val += s
        else:
            test += s
    return sorted(train), sorted(val), sorted(test)


def random_split(n: int | Sequence[object], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                 seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """A seeded random split of ``n`` rows (or of a sequence's indices) into train, val and test."""
    _check_fractions(fractions)
    size = n if isinstance(n, int) else len(n)
    perm = list(range(size))
    random.Random(seed).shuffle(perm)
    n_train, n_val = int(fractions[0] * size), int(fractions[1] * size)
    return (sorted(perm[:n_train]), sorted(perm[n_train:n_train + n_val]), sorted(perm[n_train + n_val:]))
