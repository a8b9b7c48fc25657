"""Evaluation metrics over whole prediction sets (pure numpy; missing labels are NaN)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["macro_f1", "rmse", "roc_auc"]


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
    score = np.asarray(score, dtype=np.float64).reshape(len(score), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    aucs = []
    for t in range(y.shape[1]):
        ok = ~np.isnan(y[:, t])
        labels = y[ok, t]
        if labels.size and 0 < labels.sum() < labels.size:
            aucs.append(_auc(labels, score[ok, t]))
    return float(np.mean(aucs)) if aucs else math.nan


def _auc(labels: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC of one task: the Mann-Whitney statistic, tied scores counted half (as scikit-learn)."""
    order = np.argsort(score, kind="mergesort")
    sorted_score = score[order]
    ranks = np.empty(len(score), dtype=np.float64)
    # average rank of each run of tied scores (1-based)
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    ends = np.r_[starts[1:], len(score)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_f1(pred: np.ndarray, y: np.ndarray, num_classes: int) -> float:
    """F1 averaged over classes ``0..num_classes-1``; a class never predicted nor present scores 0
    (scikit-learn's ``f1_score(average="macro", labels=range(num_classes))``)."""
    pred, y = np.asarray(pred), np.asarray(y)
    scores = []
    for c in range(num_classes):
        tp = int(((pred == c) & (y == c)).sum())
        wrong = int(((pred == c) & (y != c)).sum()) + int(((pred != c) & (y == c)).sum())
        scores.append(2.0 * tp / (2 * tp + wrong) if tp or wrong else 0.0)
    return float(np.mean(scores))
