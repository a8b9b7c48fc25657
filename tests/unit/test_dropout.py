"""KeyedDropout: a row's mask depends on (seed, step, layer, row), never on its batch mates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hvdhybrid.parallel import randomness
from hvdhybrid.parallel.dropout import KeyedDropout, keyed_dropouts


def test_a_rows_mask_does_not_depend_on_its_batch() -> None:
    d = KeyedDropout(0.5, "layer")
    x = torch.ones(6, 40)
    randomness.set_step(3, 7)
    randomness.set_rows([10, 11, 12, 13, 14, 15])
    whole = d(x)
    randomness.set_rows([14, 12])
    part = d(x[:2])
    assert torch.equal(part[0], whole[4]) and torch.equal(part[1], whole[2])
    kept = float((whole != 0).float().mean())
    assert 0.3 < kept < 0.7 and set(whole.unique().tolist()) <= {0.0, 2.0}  # scaled by 1/(1-p)


def test_the_mask_changes_with_step_layer_and_seed() -> None:
    x = torch.ones(1, 64)
    randomness.set_rows([5])
    randomness.set_step(0, 1)
    a = KeyedDropout(0.5, "a")(x)
    assert not torch.equal(a, KeyedDropout(0.5, "b")(x))
    randomness.set_step(0, 2)
    assert not torch.equal(a, KeyedDropout(0.5, "a")(x))
    randomness.set_step(1, 1)
    assert not torch.equal(a, KeyedDropout(0.5, "a")(x))


def test_eval_mode_is_the_identity_and_rows_must_match() -> None:
    d = KeyedDropout(0.3, "x")
    randomness.set_rows(None)
    with pytest.raises(RuntimeError, match="no rows"):
        d(torch.ones(2, 3))
    randomness.set_rows([1, 2, 3])
    with pytest.raises(RuntimeError, match="3 rows"):
        d(torch.ones(2, 3))
    d.eval()
    assert torch.equal(d(torch.ones(2, 3)), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        KeyedDropout(1.0, "x")


def test_keyed_dropouts_replaces_every_dropout_named_by_its_path() -> None:
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), nn.Sequential(nn.Dropout(0.2), nn.ReLU()))
    assert keyed_dropouts(m, "enc") == 2
    names = {(mod.name, mod.p) for mod in m.modules() if isinstance(mod, KeyedDropout)}
    assert names == {("enc.1", 0.1), ("enc.2.0", 0.2)}
