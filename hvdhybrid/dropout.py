"""Dropout that does not depend on the layout: masks keyed by (seed, step, layer, data row).

``nn.Dropout`` draws from each process's generator, so a model with dropout
gives different results in one process and in any hybrid layout: the rows of
a batch land on other ranks, in other microbatches, in another order. Here
row ``i`` of the data set, at optimizer step ``t``, in the layer named ``n``
always gets the mask drawn from a generator seeded by ``(seed, t, n, i)``,
whichever rank computes it. The executor tells which data rows a forward
computes (:func:`hvdhybrid.randomness.set_rows`); a plain single-process loop
calls ``randomness.set_step`` and ``randomness.set_rows`` itself.
"""

from __future__ import annotations

import torch
from torch import nn

from . import randomness

__all__ = ["KeyedDropout", "keyed_dropouts"]


class KeyedDropout(nn.Module):
    """``nn.Dropout(p)`` whose mask for each data row is keyed by (seed, step, ``name``, row).

    The first dimension of the input must be the rows of the batch.

    Args:
        p: probability of zeroing an element.
        name: the layer's name, unique in the model (e.g. its module path).

    Raises:
        RuntimeError: in training, when no rows were set or their count is not
            the input's first dimension.
    """

    def __init__(self, p: float, name: str) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.name = float(p), name

    def extra_repr(self) -> str:
        return f"p={self.p}, name={self.name!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        rows = randomness.current_rows()
        if rows is None or len(rows) != x.shape[0]:
            got = "no rows" if rows is None else f"{len(rows)} rows"
            raise RuntimeError(
                f"KeyedDropout {self.name!r}: input has {x.shape[0]} rows along dim 0 but the runtime "
                f"set {got}; the first dimension must be the batch rows (set "
                "hvdhybrid.randomness.set_rows(indices) in a loop of your own)")
        keep = torch.empty((len(rows),) + tuple(x.shape[1:]), dtype=torch.bool)
        for i, r in enumerate(rows):
            g = randomness.generator("dropout", self.name, r)
            keep[i] = torch.rand(x.shape[1:], generator=g) >= self.p
        return x * keep.to(x.device) / (1.0 - self.p)


def keyed_dropouts(module: nn.Module, prefix: str = "") -> int:
    """Replace every ``nn.Dropout`` inside ``module`` by a :class:`KeyedDropout` named by its path.

    Returns:
        How many were replaced.
    """
    n = 0
    for path, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is nn.Dropout:
                name = ".".join(x for x in (prefix.rstrip("."), path, attr) if x)
                setattr(child, attr, KeyedDropout(sub.p, name))
                n += 1
    return n
