"""The reference baseline for finetuning results: a random forest on Morgan fingerprints."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["fingerprints", "forest_predict"]


def fingerprints(mols: Sequence[Any], radius: int = 2, bits: int = 2048) -> np.ndarray:
    """Morgan (ECFP-like) bit vectors, one row per molecule."""
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)
    return np.stack([gen.GetFingerprintAsNumPy(m).astype(np.uint8) for m in mols])


def forest_predict(x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, classification: bool,
                   trees: int = 500, seed: int = 0) -> np.ndarray:
    """One forest per task, fit on the rows labelled for it; predictions (or P(class 1)) for ``x``.

    A classification task whose training labels hold one class predicts that class's frequency.
    """
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    y_train = y_train.reshape(len(y_train), -1)
    out = np.full((len(x), y_train.shape[1]), np.nan)
    for t in range(y_train.shape[1]):
        ok = ~np.isnan(y_train[:, t])
        yt = y_train[ok, t]
        if classification:
            if np.unique(yt).size < 2:
                out[:, t] = float(yt.mean()) if yt.size else 0.5
                continue
            clf = RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=1)
            clf.fit(x_train[ok], yt.astype(int))
            out[:, t] = clf.predict_proba(x)[:, 1]
        else:
            reg = RandomForestRegressor(n_estimators=trees, random_state=seed, n_jobs=1)
            reg.fit(x_train[ok], yt)
            out[:, t] = reg.predict(x)
    return out
