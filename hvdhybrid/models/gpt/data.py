"""Byte-level text for ``hvdtrain gpt``: the corpus, its sequences, and the unigram baseline."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ...training.data import TensorDataset
from ..gpt2.data import chunks, shakespeare, text_file

__all__ = ["corpus", "unigram_loss"]


def corpus(path: Optional[str], seq_len: int, limit: Optional[int] = None) -> TensorDataset:
    """Sequences of ``seq_len`` bytes with next-byte targets, from ``path`` (UTF-8) or Shakespeare's plays.

    Raises:
        DataError: a missing, empty, non-UTF-8 or too short file (one line, naming the fix).
    """
    return chunks(text_file(path) if path else shakespeare(), seq_len, limit, path or "the corpus")


def unigram_loss(train: TensorDataset, test: TensorDataset, vocab: int = 256) -> float:
    """Cross entropy (nats per byte) of ``test``'s targets under the byte frequencies of ``train``
    (add-one smoothed): what a model that ignores all context reaches."""
    counts = torch.bincount(train.y.reshape(-1), minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[test.y.reshape(-1)].mean()) if test.y.numel() else math.nan
