"""GROVER pretraining streamed from a corpus index: a shard-order shuffle and featurising ahead of use.

The order of an epoch is pure arithmetic of (seed, epoch): the shards
(SHARD molecules each) are permuted, taken ``window`` at a time, and the
molecules of each window permuted. Position ``p`` of an epoch maps to a
molecule id without reading anything before it, so a resume starts at the
exact molecule, and only one window's ids are ever held. Every rank computes
the same global batches (as :class:`~hvdhybrid.training.data.Sampler` does);
each featurises only the rows it computes, in its workers, one step ahead.
"""

from __future__ import annotations

import bisect
import time
from concurrent.futures import Future
from typing import Any, Sequence

import torch

from ...parallel import randomness
from ...training.data import DataError, Sampler
from ...training.memory import return_freed_memory
from .corpus import SHARD, CorpusIndex
from .features import Vocab
from .workers import Workers, result, timed_featurise

__all__ = ["StreamOrder", "StreamSampler", "StreamedPretrainSet"]

#: batches between purges of the allocator's freed pages: every batch has other shapes, and under
#: jemalloc with decay off (hvdtrain's default) the freed pages of earlier shapes otherwise pile up
PURGE_EVERY = 20


def _perm(n: int, *key: int) -> list[int]:
    seed = 0
    for k in key:
        seed = (seed * 1000003 + k) % (2 ** 62)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class StreamOrder:
    """The molecule ids of epoch ``e`` of ``n`` molecules, in a shard order shuffled by ``seed``."""

    def __init__(self, n: int, seed: int, window: int = 32) -> None:
        if n < 1:
            raise DataError("the corpus has no molecules to train on")
        self.n, self.seed, self.window = n, seed, window
        self.n_shards = -(-n // SHARD)
        self._epoch = -1
        self._starts: list[int] = []
        self._shards: list[int] = []
        self._win: tuple[int, list[int]] = (-1, [])

    def _shard_size(self, s: int) -> int:
        return min(SHARD, self.n - s * SHARD)

    def _set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch = epoch
            self._shards = _perm(self.n_shards, self.seed, epoch)
            self._starts = [0]
            for w in range(0, self.n_shards, self.window):
                self._starts.append(self._starts[-1] + sum(self._shard_size(s)
                                                          for s in self._shards[w:w + self.window]))
            self._win = (-1, [])

    def _window(self, w: int) -> list[int]:
        if self._win[0] != w:
            ids = [s * SHARD + j for s in self._shards[w * self.window:(w + 1) * self.window]
                   for j in range(self._shard_size(s))]
            self._win = (w, [ids[k] for k in _perm(len(ids), self.seed, self._epoch, w + 1)])
        return self._win[1]

    def ids(self, epoch: int, lo: int, hi: int) -> list[int]:
        """Positions ``lo..hi-1`` of ``epoch`` as molecule ids."""
        self._set_epoch(epoch)
        out: list[int] = []
        p = lo
        while p < hi:
            w = bisect.bisect_right(self._starts, p) - 1
            end = min(hi, self._starts[w + 1])
            win = self._window(w)
            out += win[p - self._starts[w]:end - self._starts[w]]
            p = end
        return out


class StreamSampler(Sampler):
    """:class:`Sampler`'s batches, state and resume over a :class:`StreamOrder`: no permutation held."""

    def __init__(self, n: int, batch_size: int, seed: int, window: int = 32) -> None:
        self.order = StreamOrder(n, seed, window)
        super().__init__(n, batch_size, seed)

    def _make(self) -> list[int]:
        return []

    def _where(self) -> tuple[int, int]:
        if self.pos + self.batch_size > self.n:
            return self.epoch + 1, 0
        return self.epoch, self.pos

    def peek(self) -> list[int]:
        """The batch :meth:`next` will return, without moving."""
        epoch, pos = self._where()
        return self.order.ids(epoch, pos, pos + self.batch_size)

    def next(self) -> list[int]:
        self.epoch, self.pos = self._where()
        out = self.order.ids(self.epoch, self.pos, self.pos + self.batch_size)
        self.pos += self.batch_size
        return out


class StreamedPretrainSet:
    """``n`` molecules of a corpus index (from its ``first``), featurised for pretraining by ``workers``.

    ``prefetch(step, rows)`` hands the workers the microbatches a rank will ask
    for at ``step``; ``batch(rows)`` then only waits for them. Results are kept
    only until used: memory stays bounded by one step's batches.
    """

    def __init__(self, index: CorpusIndex, n: int, mask_rate: float, workers: Workers,
                 window: int = 32, first: int = 0) -> None:
        self.index, self.n, self.mask_rate, self.workers, self.window = index, n, mask_rate, workers, window
        self.first = first  # molecule i of this set is the corpus's molecule first + i
        # featurising in this process: the vocabularies go with each call (workers load their own)
        self._vocabs = None if workers.n else tuple(Vocab.from_json(v) for v in index.vocabs)
        self._pending: dict[tuple[int, int, tuple[int, ...]], Future[Any]] = {}
        self._used = False
        #: seconds the trainer waited for featurising, molecules featurised, and those that did not parse
        self.wait_s = 0.0
        self.molecules = 0
        self.skipped = 0
        self.featurise_s = 0.0  # CPU seconds spent featurising them (in the workers or here)
        self._calls = 0

    def __len__(self) -> int:
        return self.n

    def make_sampler(self, batch_size: int, seed: int) -> StreamSampler:
        return StreamSampler(self.n, batch_size, seed, self.window)

    def _submit(self, seed: int, step: int, rows: Sequence[int]) -> Future[Any]:
        ids = list(rows)
        smiles = self.index.smiles([self.first + i for i in ids])
        return self.workers.submit(timed_featurise, seed, step, ids, smiles, self.mask_rate, self._vocabs)

    def prefetch(self, seed: int, step: int, rows: Sequence[Sequence[int]]) -> None:
        """Start featurising the microbatches ``rows`` of ``step`` (on ranks that read data at all)."""
        if not self._used or not self.workers.n:
            return
        for key in [k for k in self._pending if k[1] < step - 1]:  # never asked for: drop
            self._pending.pop(key).cancel()
        cap = 2 * len(rows) + 2 * self.workers.capacity  # this step's and the next one's, at most
        for r in rows:
            key = (seed, step, tuple(r))
            if key not in self._pending and len(self._pending) < cap:
                self._pending[key] = self._submit(seed, step, r)

    def batch(self, indices: Sequence[int]) -> tuple[Any, Any]:
        self._used = True
        seed, step, _ = randomness.snapshot()
        key = (seed, step, tuple(indices))
        fut = self._pending.pop(key, None)
        t0 = time.perf_counter()
        out, spent = result(fut if fut is not None else self._submit(seed, step, indices))
        self.wait_s += time.perf_counter() - t0
        self.featurise_s += spent
        self.molecules += len(indices)
        self.skipped += int((out[1].motif_w == 0).sum())
        self._calls += 1
        if self._calls % PURGE_EVERY == 0:
            return_freed_memory()
        return out  # type: ignore[no-any-return]

    def progress(self) -> str:
        """Featurising cost per molecule, for the progress line."""
        return f"featurising {1e3 * self.featurise_s / max(1, self.molecules):.1f} ms/molecule"

    def close(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        self.workers.close()
        self.index.close()
