"""Checkpoints written in the background: the step's state is copied, then a thread writes it.

Training waits only for the copy (``--checkpoint-every`` with ``--checkpoint-async``, the default).
Each rank's thread writes its files as the synchronous path does (temporary name, fsync,
rename), but past the page cache (:mod:`direct_io`), then a *part* file,
``part-<nonce>-<rank>.json``: what it wrote, with checksums, and its
entries of the name and share maps. World rank 0's thread, once every rank's part is there,
commits the checkpoint as the synchronous path does: manifest, then ``latest``, then pruning.
No MPI call is made off the main thread, so the MPI library needs no thread support.

A kill at any moment leaves the checkpoint being written without a manifest (incomplete,
skipped on resume, with a warning) and the newest complete one untouched: nothing is pruned
before the new one is committed. One write is in flight at a time: the next checkpoint first
waits for the last. A write that failed raises on the main thread at the next checkpoint or at
the end of training.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
import time
from typing import Any, Callable, Optional

import torch

from ..log import get_logger
from .checkpoint import CheckpointError, Entry, Manifest, atomic_write, commit, step_dir, write_shard
from .direct_io import DIRECT_MIN

__all__ = ["BackgroundWriter", "aligned_copy", "snapshot"]

POLL_S = 0.05


def snapshot(obj: Any, into: Any = None) -> Any:
    """``obj`` with every tensor in it (in dicts, lists, tuples) copied to CPU memory: into the tensor at
    the same place in ``into`` (the last snapshot) where its shape and dtype match, else to new memory.
    Reusing the last copy's memory spares the page faults of fresh memory (0.03 s against 0.008 s for
    128 MB here)."""
    if torch.is_tensor(obj):
        src = obj.detach()
        if (torch.is_tensor(into) and into.shape == src.shape and into.dtype == src.dtype
                and into.device.type == "cpu" and into.is_contiguous() and src.is_contiguous()):
            return into.copy_(src)
        return aligned_copy(src)
    if isinstance(obj, dict):
        old = into if isinstance(into, dict) else {}
        return {k: snapshot(v, old.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        olds = list(into) if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(snapshot(v, o) for v, o in zip(obj, olds))
    return obj


def aligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``t``; from 1 MB, in page-aligned memory of its own (an anonymous map, freed with the
    tensor), which a write past the page cache sends without copying it again (:mod:`direct_io`)."""
    nbytes = t.numel() * t.element_size()
    if nbytes < DIRECT_MIN or not t.is_contiguous():
        return t.to("cpu", copy=True)
    out = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=t.dtype).view(t.shape)
    return out.copy_(t)


class BackgroundWriter:
    """One rank's checkpoint-writing thread.

    Args:
        rank, world_size: this rank in the world, and how many parts world rank 0 waits for.
        timeout: seconds rank 0 waits for the other ranks' parts before leaving the checkpoint
            incomplete (and failing the run at its next checkpoint).
    """

    def __init__(self, rank: int, world_size: int, timeout: float) -> None:
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[str] = None
        self.written: list[int] = []  # steps this rank finished writing (rank 0: committed)
        self._staging: Any = None  # the last snapshot, whose memory the next one reuses

    def submit(self, root: str, step: int, manifest: Manifest, files: dict[str, dict[str, Any]],
               names: dict[str, list[dict[str, Any]]], optim: dict[str, list[dict[str, Any]]],
               keep: int, nonce: str, after_shard: Optional[Callable[[], None]] = None) -> str:
        """Copy ``files`` (this rank's state at ``step``) and write them in the background.

        Returns:
            The checkpoint's directory (complete once rank 0 has committed it).
        """
        self.wait()
        files = self._staging = snapshot(files, self._staging)
        args = (root, step, manifest, files, names, optim, keep, nonce, after_shard)
        self._thread = threading.Thread(target=self._write, args=args, daemon=True,
                                        name=f"hvdhybrid-checkpoint-{step}")
        self._thread.start()
        return step_dir(root, step)

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; raise what it failed with."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(error)

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _write(self, root: str, step: int, manifest: Manifest, files: dict[str, dict[str, Any]],
               names: dict[str, list[dict[str, Any]]], optim: dict[str, list[dict[str, Any]]],
               keep: int, nonce: str, after_shard: Optional[Callable[[], None]]) -> None:
        try:
            d = step_dir(root, step)
            os.makedirs(d, exist_ok=True)
            written = [(name, *write_shard(os.path.join(d, name), state, direct=True))
                       for name, state in sorted(files.items())]
            if after_shard is not None:  # failure tests: die with the shard written, the part not
                after_shard()
            atomic_write(_part(d, nonce, self.rank), json.dumps([written, names, optim]).encode())
            if self.rank == 0:
                commit(root, step, manifest, self._collect(d, step, nonce), keep)
                for r in range(self.world_size):
                    os.remove(_part(d, nonce, r))
                get_logger().info(f"checkpoint step {step} written to {d} (in the background)")
            self.written.append(step)
        except BaseException as e:  # handed to the main thread by wait()
            self._error = f"writing checkpoint step {step} in the background failed: {e}"

    def _collect(self, d: str, step: int, nonce: str) -> list[Entry]:
        """Rank 0: every rank's part of this write, once all are on disk."""
        t0 = time.monotonic()
        while True:
            missing = [r for r in range(self.world_size) if not os.path.exists(_part(d, nonce, r))]
            if not missing:
                break
            if time.monotonic() - t0 > self.timeout:
                raise CheckpointError(f"ranks {missing} did not finish writing checkpoint step {step} "
                                      f"within {self.timeout:.0f} s; it stays incomplete")
            time.sleep(POLL_S)
        entries: list[Entry] = []
        for r in range(self.world_size):
            with open(_part(d, nonce, r)) as f:
                written, names, optim = json.load(f)
            entries.append(([(str(n), str(h), int(size)) for n, h, size in written], names, optim))
        return entries


def _part(d: str, nonce: str, rank: int) -> str:
    return os.path.join(d, f"part-{nonce}-{rank:05d}.json")
