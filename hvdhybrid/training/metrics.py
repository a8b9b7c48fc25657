"""Evaluation metrics over whole prediction sets (pure numpy; missing labels are NaN)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["rmse", "roc_auc"]


def rmse(pred: np.ndarray, y: np.ndarray) -> float:
    """Root mean squared error over every labelled (row, task) cell; NaN if none is labelled."""
    pred, y = np.asarray(pred, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = ~np.isnan(y)
    if not ok.any():
        return math.nan
    return float(np.sqrt(np.mean((pred[ok] - y[ok]) ** 2)))


def roc_auc(score: np.ndarray, y: np.ndarray) -> float:
    """Mean ROC-AUC over tasks; a task whose labelled rows hold one class only is left out.

    Returns NaN when no task has both classes.
    """
    from sklearn.metrics import roc_auc_score

    score = np.asarray(score, dtype=np.float64).reshape(len(score), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    aucs = []
    for t in range(y.shape[1]):
        ok = ~np.isnan(y[:, t])
        labels = y[ok, t]
        if labels.size and 0 < labels.sum() < labels.size:
            aucs.append(float(roc_auc_score(labels, score[ok, t])))
    return float(np.mean(aucs)) if aucs else math.nan
