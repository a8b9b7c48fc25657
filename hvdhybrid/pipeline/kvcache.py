"""Keys and values of a sequence's earlier token slices, kept on one stage, and the gradients they carry.

Token-dimension pipelining (TeraPipe) cuts each sequence into slices along the
token axis. Attention in slice ``i`` needs the keys and values of slices
``0 .. i-1``, which the same stage computed earlier in the step. A
:class:`SliceCache` keeps them for one (stage, microbatch) while the step runs:

- forward of slice ``i``: each attention layer calls :meth:`SliceCache.extend`
  with its own keys and values; it gets back the keys and values of slices
  ``0 .. i`` (the earlier ones as autograd *leaves*, detached from the graph of
  the slice that made them), and the cache keeps a leaf of this slice's keys
  and values for the slices after it;
- backward of slice ``i`` (run after the backward of slice ``i+1``, the
  dependency rule of :mod:`actions`): the later slices have left the gradients
  of this slice's keys and values in its leaves' ``.grad``. The executor adds
  (keys, leaf.grad) and (values, leaf.grad) to the backward's roots
  (:meth:`SliceCache.carried`), so they flow on into this slice's graph.

The cache holds only integers and tensor references; the model decides what
to keep (per layer, under a name) and the executor decides when.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["SliceCache"]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    out = t.detach()
    return out.requires_grad_() if t.requires_grad else out


class SliceCache:
    """The cache of one sequence batch (one microbatch) on one stage, over its token slices.

    Args:
        lengths: the token length of each slice, in order; they sum to the sequence length.
    """

    def __init__(self, lengths: Sequence[int]) -> None:
        self.lengths = tuple(int(n) for n in lengths)
        self.index = 0
        self._past: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._made: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._used: dict[int, list[torch.Tensor]] = {}

    @property
    def start(self) -> int:
        """Position of the current slice's first token in the sequence."""
        return sum(self.lengths[:self.index])

    @property
    def stop(self) -> int:
        return self.start + self.lengths[self.index]

    @property
    def total(self) -> int:
        """The whole sequence's length."""
        return sum(self.lengths)

    def begin(self, index: int) -> None:
        """The next forward computes slice ``index``."""
        self.index = index

    def extend(self, name: str, k: torch.Tensor, v: torch.Tensor,
               dim: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slices ``0 .. index`` for layer ``name``, joined along ``dim``.

        Raises:
            RuntimeError: if the layer skipped an earlier slice (slices must run in order).
        """
        past = self._past.setdefault(name, [])
        if len(past) != self.index:
            raise RuntimeError(f"layer {name!r} has keys of {len(past)} earlier slices, but slice "
                               f"{self.index} is running: token slices must run in order")
        self._used.setdefault(self.index, []).extend(t for pair in past for t in pair)
        if self.index + 1 < len(self.lengths):
            lk, lv = _leaf(k), _leaf(v)
            past.append((lk, lv))
            self._made.setdefault(self.index, []).extend([(k, lk), (v, lv)])
        if self.index == 0:
            return k, v
        ks = [p[0] for p in past[:self.index]] + [k]
        vs = [p[1] for p in past[:self.index]] + [v]
        return torch.cat(ks, dim), torch.cat(vs, dim)

    def carried(self, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys or values of slice ``index``, the gradient later slices left on them), for backward."""
        return [(orig, leaf.grad) for orig, leaf in self._made.get(index, [])
                if leaf.grad is not None and orig.requires_grad]

    def used(self, index: int) -> list[torch.Tensor]:
        """The leaves of earlier slices that slice ``index`` attended to (inputs of a split backward)."""
        return [t for t in self._used.get(index, []) if t.requires_grad]
