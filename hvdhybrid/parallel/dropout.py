"""Dropout that does not depend on the layout: masks keyed by (seed, step, layer, data row).

``nn.Dropout`` draws from each process's generator, so a model with dropout
gives different results in one process and in any hybrid layout: the rows of
a batch land on other ranks, in other microbatches, in another order. Here
row ``i`` of the data set, at optimizer step ``t``, in the layer named ``n``
always gets the mask drawn from a generator seeded by ``(seed, t, n, i)``,
whichever rank computes it. The executor tells which data rows a forward
computes (:func:`hvdhybrid.parallel.randomness.set_rows`); a plain single-process loop
calls ``randomness.set_step`` and ``randomness.set_rows`` itself.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from . import randomness

__all__ = ["KeyedDropout", "MaskTape", "SegmentDropout", "keyed_drop", "keyed_dropouts", "keyed_head_drop",
           "keyed_window_drop"]

Index = Union[int, slice]


class _Keyed(nn.Module):
    """A dropout probability and the layer's name, which keys its masks."""

    def __init__(self, p: float, name: str) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.name = float(p), name

    def extra_repr(self) -> str:
        return f"p={self.p}, name={self.name!r}"


class KeyedDropout(_Keyed):
    """``nn.Dropout(p)`` whose mask for each data row is keyed by (seed, step, ``name``, row).

    The first dimension of the input must be the rows of the batch.

    Args:
        p: probability of zeroing an element.
        name: the layer's name, unique in the model (e.g. its module path).

    Raises:
        RuntimeError: in training, when no rows were set or their count is not
            the input's first dimension.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        rows = _rows(self.name, x.shape[0], "the first dimension must be the batch rows")
        return keyed_drop(x, self.p, self.name, [(r, (i,)) for i, r in enumerate(rows)])


class MaskTape:
    """The dropout masks a region draws in its forward, handed back in order when it is recomputed.

    Redrawing a keyed mask costs more than the attention it drops (a generator per row, a
    float per element: about 2.9 ms for two rows of 8 x 256 x 256 where packing the mask
    takes 0.03 ms), so recomputation keeps the masks, packed to 1 bit per element
    (:attr:`masks`, uint8), and recomputes only the arithmetic. Within :meth:`recording`,
    every keyed draw is appended; within :meth:`replaying` (re-enterable: a split backward,
    B then W, recomputes twice) the draws are the recorded masks again, in the same order.
    """

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []  # packed: 8 elements per byte
        self._shapes: list[torch.Size] = []
        self._at: list[int] = []  # one cursor per replay in progress

    def recording(self) -> "_Active":
        return _Active(self, replay=False)

    def replaying(self) -> "_Active":
        return _Active(self, replay=True)

    def take(self, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not self._at:
            mask = draw()
            self.masks.append(torch.from_numpy(np.packbits(mask.numpy())))
            self._shapes.append(mask.shape)
            return mask
        i = self._at[-1]
        if i >= len(self.masks):
            raise RuntimeError("a recomputed region drew more dropout masks than its forward did")
        self._at[-1] = i + 1
        shape = self._shapes[i]
        bits = np.unpackbits(self.masks[i].numpy(), count=shape.numel())
        return torch.from_numpy(bits.view(np.bool_)).view(shape)


class _Active:
    """Makes ``tape`` the one keyed draws go through, within (a context manager; re-enterable)."""

    def __init__(self, tape: MaskTape, replay: bool) -> None:
        self.tape, self.replay = tape, replay
        self.before: list[Optional[MaskTape]] = []

    def __enter__(self) -> None:
        self.before.append(_TAPE[0])
        _TAPE[0] = self.tape
        if self.replay:
            self.tape._at.append(0)

    def __exit__(self, *exc: object) -> None:
        if self.replay:
            self.tape._at.pop()
        _TAPE[0] = self.before.pop()


_TAPE: list[Optional[MaskTape]] = [None]


def _mask(draw: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``draw()``, or its recorded mask when a :class:`MaskTape` is active."""
    tape = _TAPE[0]
    return draw() if tape is None else tape.take(draw)


def _rows(name: str, n: int, hint: str) -> tuple[int, ...]:
    rows = randomness.current_rows()
    if rows is None or len(rows) != n:
        got = "no rows" if rows is None else f"{len(rows)} rows"
        raise RuntimeError(
            f"keyed dropout {name!r}: the input holds {n} data rows but the runtime set {got}; {hint} "
            "(in a loop of your own, call hvdhybrid.parallel.randomness.set_rows(indices))")
    return rows


def keyed_drop(x: torch.Tensor, p: float, name: str,
               pieces: Sequence[tuple[int, tuple[Index, ...]]]) -> torch.Tensor:
    """Dropout on ``x`` whose mask in ``x[index]`` is drawn for data row ``row``, for each (row, index).

    The mask of a piece depends only on (seed, step, ``name``, row) and the piece's shape,
    so it is the same in any batch, microbatch or rank that computes that row. Elements
    outside every piece are kept (padding).
    """
    def draw() -> torch.Tensor:
        keep = torch.ones(x.shape, dtype=torch.bool)
        for row, index in pieces:
            g = randomness.generator("dropout", name, row)
            keep[index] = torch.rand(keep[index].shape, generator=g) >= p
        return keep
    return x * _mask(draw).to(x.device) / (1.0 - p)


def keyed_window_drop(x: torch.Tensor, p: float, name: str, whole: Sequence[int],
                      window: Sequence[Index]) -> torch.Tensor:
    """Keyed dropout on ``x = [rows, ...]``, a window of each row's whole extent ``whole``.

    Each row's mask is drawn for the whole extent (all heads, every token of the
    sequence) and ``window`` (one index per dimension after the rows) keeps this
    call's part: the heads of this tensor rank, the tokens of this token slice.
    So the mask of an element depends neither on the tensor split nor on the slicing.
    """
    rows = _rows(name, x.shape[0], "the first dimension must be the batch rows")

    def draw() -> torch.Tensor:
        keep = torch.empty(x.shape, dtype=torch.bool)
        for i, r in enumerate(rows):
            g = randomness.generator("dropout", name, r)
            keep[i] = (torch.rand(tuple(whole), generator=g) >= p)[tuple(window)]
        return keep
    return x * _mask(draw).to(x.device) / (1.0 - p)


def keyed_head_drop(x: torch.Tensor, p: float, name: str, heads: int, first: int) -> torch.Tensor:
    """Keyed dropout on ``x`` = ``[rows, local heads, ...]``, heads ``first ..`` of ``heads`` in all
    (attention split by heads over tensor ranks): each row's mask is drawn for every head and this
    rank keeps its heads' part, so the mask does not depend on the tensor split either."""
    return keyed_window_drop(x, p, name, (heads,) + tuple(x.shape[2:]), (slice(first, first + x.shape[1]),))


class SegmentDropout(_Keyed):
    """Keyed dropout on rows packed by data row: ``x[start:start+size]`` belongs to row ``i``
    of the batch for ``scope[i] = (start, size)`` (a molecule's atoms in a graph batch).

    Args:
        p: probability of zeroing an element.
        name: the layer's name, unique in the model.
    """

    def forward(self, x: torch.Tensor, scope: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        rows = _rows(self.name, scope.shape[0], "scope must hold one (start, size) per batch row")
        return keyed_drop(x, self.p, self.name,
                          [(r, (slice(a, a + n),)) for r, (a, n) in zip(rows, scope.tolist())])

    def square(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Dropout on padded ``[rows, ..., L, L]`` (attention probabilities): row ``i`` keyed on its
        ``sizes[i] x sizes[i]`` corner, whatever the padded length ``L`` of this batch."""
        if not self.training or self.p == 0.0:
            return x
        rows = _rows(self.name, x.shape[0], "the first dimension must be the batch rows")
        lead: tuple[Index, ...] = (slice(None),) * (x.dim() - 3)
        corners = [(r, (i, *lead, slice(0, n), slice(0, n))) for i, (r, n) in enumerate(zip(rows, sizes))]
        return keyed_drop(x, self.p, self.name, corners)


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
