"""Bytes of activations saved for the backward, counted with saved-tensor hooks: live now, and the peak.

Every tensor autograd saves during a stage's forward passes through
:meth:`SavedBytes.hooks`; a tensor's storage counts once however many times (or
through however many views) it is saved, until the last holder is freed with
its graph. Parameters (and views of them) are not activations and are left
out. Under recomputation only what is kept counts: torch's checkpoint saves
the region's inputs through these hooks and its own activations through its
own, inner ones.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

__all__ = ["SavedBytes"]


class _Held:
    """A saved tensor and the counter to tell when its graph lets go of it."""

    __slots__ = ("tensor", "ptr", "counter")

    def __init__(self, tensor: torch.Tensor, ptr: int, counter: "SavedBytes") -> None:
        self.tensor, self.ptr, self.counter = tensor, ptr, counter

    def __del__(self) -> None:
        self.counter._release(self.ptr)


class SavedBytes:
    """Live and peak bytes of saved activations on this rank."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [bytes, holders]
        self._skip: set[int] = set()

    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Storages never counted (the parameters)."""
        self._skip = {t.untyped_storage().data_ptr() for t in tensors}

    def reset_peak(self) -> None:
        self.peak = self.live

    def hooks(self) -> Any:
        """The context a forward runs in for its saves to be counted."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        if t.device.type == "meta":
            return t
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self._skip:
            return t
        entry = self._refs.get(ptr)
        if entry is None:
            self._refs[ptr] = [storage.nbytes(), 1]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        else:
            entry[1] += 1
        # detached: a saved output held as itself would hold its own grad_fn, whose saved variable holds
        # it (a cycle through C++ that Python's collector cannot see): with a graph kept for a split W
        # (retain_graph), its activations were never freed (and never uncounted)
        return _Held(t.detach(), ptr, self)

    @staticmethod
    def _unpack(held: Any) -> torch.Tensor:
        return held.tensor if isinstance(held, _Held) else held  # type: ignore[no-any-return]

    def _release(self, ptr: int) -> None:
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[ptr]
