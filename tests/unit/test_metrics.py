"""The metrics are computed without scikit-learn (its import costs about 2 s per rank):
each is checked against scikit-learn's own on random data with ties and absent classes."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from hvdhybrid.training.data import digits
from hvdhybrid.training.metrics import _auc, macro_f1


@pytest.mark.parametrize("seed", range(6))
def test_auc_equals_scikit_learn_with_tied_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    labels = rng.integers(0, 2, n).astype(float)
    labels[:2] = [0, 1]
    score = np.round(rng.normal(size=n), int(rng.integers(0, 3)))   # few decimals: many ties
    assert _auc(labels, score) == pytest.approx(roc_auc_score(labels, score), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_macro_f1_equals_scikit_learn_with_absent_classes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    y = rng.integers(0, k - 1, 50)            # class k-1 never labelled
    pred = rng.integers(0, k, 50)
    want = f1_score(y, pred, average="macro", labels=list(range(k)), zero_division=0)
    assert macro_f1(pred, y, k) == pytest.approx(want, abs=1e-12)


def test_digits_are_scikit_learns_without_importing_it() -> None:
    from sklearn.datasets import load_digits

    ds = digits(image_size=8)
    d = load_digits()
    assert np.array_equal(ds.x.squeeze(1).numpy() * 16.0, d.images.astype(np.float32))
    assert np.array_equal(ds.y.numpy(), d.target)


def test_the_runtime_does_not_import_scikit_learn() -> None:
    import subprocess

    code = ("import sys; from hvdhybrid.training.data import digits; import hvdhybrid.cli.bert; "
            "from hvdhybrid.training import metrics; digits(); "
            "metrics.macro_f1([0], [0], 2); metrics.roc_auc([[0.1], [0.9]], [[0], [1]]); "
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
