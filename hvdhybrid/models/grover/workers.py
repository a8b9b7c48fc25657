"""GROVER's featurising workers: processes of one rank that parse and featurise molecules as training goes.

A :class:`Workers` pool runs the module-level functions below in ``n``
spawned processes (no MPI there: they import RDKit and torch only), or in the
calling process when ``n`` is 0. Work goes in as chunks; at most ``depth``
chunks per worker are in flight, so the queues stay bounded whatever the
corpus size. A worker that dies takes the pool down with a one-line error
naming the molecules it was given.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

from ...training.data import DataError

__all__ = ["Workers", "parse_chunk", "featurise_batch", "peak_rss", "timed_featurise", "WorkerError"]

T = TypeVar("T")
_VOCABS: dict[str, Any] = {}
_DIED = "a featurising worker died (out of memory?); rerun with fewer --workers or --workers 0"


class WorkerError(DataError):
    """A featurising worker failed or died."""


def _init(vocabs: Optional[tuple[str, str]]) -> None:
    """A worker process's start: one thread, stops left to the rank, any core, the vocabularies."""
    import signal

    import torch

    torch.set_num_threads(1)
    # a stop (Ctrl-C, scancel) is the rank's to handle: it finishes the step and checkpoints
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:  # mpirun binds a rank (<= 2 per host) to one core, and its children inherit it
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError):
        pass
    if vocabs is not None:
        from .features import Vocab

        _VOCABS["atom"], _VOCABS["bond"] = (Vocab.from_json(v) for v in vocabs)


def parse_chunk(first: int, smiles: Sequence[str]) -> tuple[list[int], Counter[str], Counter[str]]:
    """Records ``first..`` parsed: (the ones that do not parse, the others' atom and bond contexts)."""
    from rdkit import Chem
    from rdkit.rdBase import BlockLogs

    from .features import atom_context, bond_context

    bad: list[int] = []
    atoms: Counter[str] = Counter()
    bonds: Counter[str] = Counter()
    with BlockLogs():
        for r, s in enumerate(smiles, first):
            mol = Chem.MolFromSmiles(s) if s else None
            if mol is None or mol.GetNumAtoms() == 0:
                bad.append(r)
            else:
                atoms.update(atom_context(a) for a in mol.GetAtoms())
                bonds.update(bond_context(b) for b in mol.GetBonds())
    return bad, atoms, bonds


def featurise_batch(seed: int, step: int, ids: Sequence[int], smiles: Sequence[str], mask_rate: float,
                    vocabs: Optional[tuple[Any, Any]] = None) -> tuple[Any, Any]:
    """The masked pretraining batch of molecules ``ids`` (their SMILES given), drawn as at (seed, step).

    A SMILES that does not parse keeps its row as a stand-in that weighs nothing (``motif_w`` 0).
    """
    from rdkit import Chem
    from rdkit.rdBase import BlockLogs

    from ...parallel import randomness
    from .data import masked_batch, pretrain_item

    av, bv = vocabs if vocabs is not None else (_VOCABS["atom"], _VOCABS["bond"])
    items = []
    dead: set[int] = set()
    with BlockLogs():
        for j, s in enumerate(smiles):
            mol = Chem.MolFromSmiles(s) if s else None
            if mol is None or mol.GetNumAtoms() == 0:
                dead.add(j)
                mol = Chem.MolFromSmiles("C")
            items.append(pretrain_item(mol, av, bv))
    with randomness.restored((seed, step, None)):
        return masked_batch(items, list(ids), mask_rate, frozenset(dead))


def timed_featurise(*args: Any) -> tuple[tuple[Any, Any], float]:
    """:func:`featurise_batch` and the seconds it took (process CPU time of the one who ran it)."""
    import time

    t0 = time.process_time()
    out = featurise_batch(*args)
    return out, time.process_time() - t0


def peak_rss() -> int:
    """This process's peak resident set, in bytes (Linux reports KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Workers:
    """``n`` featurising processes (0: the calling process does the work), at most ``depth`` chunks each.

    The processes start on the first :meth:`submit`: a rank that never reads data starts none.
    """

    def __init__(self, n: int, vocabs: Optional[tuple[str, str]] = None, depth: int = 2) -> None:
        """``vocabs``: (atom, bond) vocabularies as JSON, loaded once by each worker process."""
        if n < 0:
            raise DataError(f"--workers must be >= 0, got {n}")
        self.n, self.depth, self._vocabs = n, depth, vocabs
        self._pool: Optional[ProcessPoolExecutor] = None  # started on the first submit

    @property
    def capacity(self) -> int:
        """How many chunks may be in flight at once."""
        return max(1, self.n * self.depth)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        fut: Future[T] = Future()
        if not self.n:
            try:
                fut.set_result(fn(*args))
            except Exception as e:  # handed to result(), as a process pool would
                fut.set_exception(e)
            return fut
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.n, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init, initargs=(self._vocabs,))
        try:
            return self._pool.submit(fn, *args)
        except BrokenProcessPool:
            raise WorkerError(_DIED) from None

    def map(self, fn: Callable[..., T], chunks: Iterable[tuple[Any, ...]]) -> Iterator[T]:
        """``fn(*chunk)`` for every chunk, in order, with at most :attr:`capacity` in flight."""
        pending: list[Future[T]] = []
        for chunk in chunks:
            pending.append(self.submit(fn, *chunk))
            if len(pending) >= self.capacity:
                yield result(pending.pop(0))
        for fut in pending:
            yield result(fut)

    def peak_rss(self) -> int:
        """The largest peak RSS among the worker processes (0: none started)."""
        if self._pool is None:
            return 0
        return max(result(self._pool.submit(peak_rss)) for _ in range(2 * self.n))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def result(fut: Future[T]) -> T:
    """The future's result; a worker that died becomes a one-line :class:`WorkerError`."""
    try:
        return fut.result()
    except BrokenProcessPool:
        raise WorkerError(_DIED) from None
