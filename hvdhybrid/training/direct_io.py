"""A write-only file that bypasses the page cache (``O_DIRECT``), for checkpoints written in the background.

Written the usual way, a background checkpoint of 258 MB made the training steps that ran meanwhile
take twice their time on a 2-vCPU machine (the kernel's copy into the page cache and its write-back
compete with the step), while the same bytes written with ``O_DIRECT`` cost them under 10%
(docs/benchmarks.md). Writes are gathered in a page-aligned block and go out a block at a time; the
last partial block is written with ``O_DIRECT`` cleared (its size is not a multiple of the alignment).
A write of at least 1 MB from page-aligned memory, arriving where the file is at a multiple of 4096
(``torch.save`` of a shard puts each tensor's bytes there, :mod:`shard_file`; the background copy of
the state is page-aligned, :func:`background_save.aligned_copy`), goes out from where it is, without
the copy into the block.
Where the file system refuses ``O_DIRECT`` (tmpfs), :func:`open_direct` returns an ordinary file.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from typing import Any, Union

import numpy as np

from .checksum import Checksum

__all__ = ["DirectFile", "open_direct"]

ALIGN = 4096
BLOCK = 8 << 20
DIRECT_MIN = 1 << 20  # a write at least this long, page-aligned, goes out from where it is


def _address(mv: memoryview) -> int:
    return int(np.frombuffer(mv, dtype=np.uint8).ctypes.data) if len(mv) else 0


class DirectFile:
    """``write``, ``flush`` (a no-op until :meth:`close`), ``fileno`` and ``close`` (which writes the
    rest, fsyncs and closes); ``checksum`` and ``size`` of what it wrote (one pass over the bytes fewer
    than hashing them on their way in)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = mmap.mmap(-1, BLOCK)  # anonymous maps are page-aligned, as O_DIRECT needs
        self.arr = np.frombuffer(self.buf, dtype=np.uint8)  # numpy copies into it without the GIL
        self.n = 0
        self.checksum = Checksum()  # of what went out, taken from the block while it is in cache
        self.size = 0

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        total = len(mv)
        if self.n % ALIGN == 0 and len(mv) >= DIRECT_MIN and _address(mv) % ALIGN == 0 and self._direct():
            self._out(self.n)  # the block, so that the file is where mv starts (an aligned offset)
            k = len(mv) - len(mv) % ALIGN
            self._send(mv[:k])  # straight from the caller's page-aligned memory: no copy
            mv = mv[k:]
        while len(mv):
            k = min(len(mv), BLOCK - self.n)
            self.arr[self.n:self.n + k] = np.frombuffer(mv[:k], dtype=np.uint8)
            self.n += k
            mv = mv[k:]
            if self.n == BLOCK:
                self._out(BLOCK)
        return total

    def _out(self, size: int) -> None:
        """Write the block's first ``size`` bytes (a multiple of ALIGN, or the tail) and keep the rest."""
        view = memoryview(self.buf)
        self._send(view[:size])
        rest = self.n - size
        if rest:
            self.arr[:rest] = self.arr[size:self.n]
        self.n = rest
        view.release()

    def _send(self, view: memoryview) -> None:
        """Write ``view`` (page-aligned, a multiple of ALIGN long unless O_DIRECT is off) and checksum it."""
        size = len(view)
        for at in range(0, size, BLOCK):  # checksummed a block at a time, just before it goes out
            part = view[at:at + BLOCK]
            self.checksum.update(part)
            done = 0
            while done < len(part):
                try:
                    done += os.write(self.fd, part[done:])
                except OSError as e:  # a file system that took the flag but not the write: go on without
                    if e.errno != errno.EINVAL or not self._direct():
                        raise
                    self._clear()
        self.size += size

    def _direct(self) -> bool:
        return bool(fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_DIRECT)

    def _clear(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        try:
            self._out(self.n - self.n % ALIGN)
            if self.n:  # the tail: not a multiple of the alignment, so without O_DIRECT
                self._clear()
                self._out(self.n)
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            del self.arr
            self.buf.close()


def open_direct(path: str) -> Union[DirectFile, Any]:
    """``path`` opened for writing with O_DIRECT (truncated), or as an ordinary binary file where the
    file system does not allow it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError:
        return open(path, "wb")
    if not getattr(os, "O_DIRECT", 0):
        return os.fdopen(fd, "wb")
    return DirectFile(fd)
