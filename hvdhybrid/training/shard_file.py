"""One shard file of a checkpoint: ``torch.save`` streamed to a temporary name with its checksum taken on the
way out, fsynced and renamed (past the page cache for writes in the background, :mod:`direct_io`).

The checksum (:class:`Checksum`) is a CRC-32 of the whole file, written ``crc32:<8 hex digits>``: it
finds the torn, truncated or damaged file a checkpoint must never be resumed from, as SHA-256 did, at
a third of the CPU time (zlib 6.7 GB/s against 1.9 GB/s here), which a write in the background takes
from the training steps (docs/benchmarks.md). Checkpoints written with SHA-256 (64 hex digits) are
still verified by it. Since the manifest's checksum proves each file whole, the zip records inside are
written without their own CRC-32, which torch computes holding the GIL (0.47 s of 0.62 s for 256 MB
here), and each tensor's bytes start at a multiple of 4096 in the file, so that a write past the page
cache sends a page-aligned copy of the state from where it is (:mod:`direct_io`). ``torch.load`` reads
such files as it reads any.
"""

from __future__ import annotations

import io
import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .checksum import Checksum, checksum
from .direct_io import ALIGN, DirectFile, open_direct  # ALIGN: where each tensor's bytes start

__all__ = ["FORMAT", "Checksum", "checksum", "encode_shard", "file_digest", "fsync_dir", "write_shard",
           "shard_save_settings"]

FORMAT = 2

_lock = threading.Lock()
_users = 0
_before: tuple[bool, int] = (True, 64)


@contextmanager
def shard_save_settings() -> Iterator[None]:
    """``torch.save`` as shards are written: the zip records without their own CRC-32, each tensor's bytes
    at a file offset that is a multiple of 4096. Settings of the whole process, so counted: the last of
    overlapping users, from any thread, restores what was set before the first."""
    global _users, _before
    from torch.utils.serialization import config as serialization

    config = serialization.save
    with _lock:
        if _users == 0:
            _before = (torch.serialization.get_crc32_options(), config.storage_alignment)
            torch.serialization.set_crc32_options(False)
            config.storage_alignment = ALIGN
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                torch.serialization.set_crc32_options(_before[0])
                config.storage_alignment = _before[1]


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_shard(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    return buf.getvalue()


class _Hashing:
    """A file that checksums and counts what goes through it (torch.save streams into it)."""

    def __init__(self, f: Any) -> None:
        self.f, self.h, self.n = f, Checksum(), 0

    def write(self, b: Any) -> int:
        self.h.update(b)
        self.n += len(memoryview(b).cast("B"))
        return int(self.f.write(b))

    def flush(self) -> None:
        self.f.flush()


def write_shard(path: str, state: dict[str, Any], direct: bool = False) -> tuple[str, int]:
    """``state`` streamed to ``path`` (temporary name, fsync, rename): no copy of its tensors in memory.
    ``direct``: past the page cache (:mod:`direct_io`; for writes in the background).

    Returns:
        The file's checksum (:class:`Checksum`) and size.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    f = open_direct(tmp) if direct else open(tmp, "wb")
    try:
        out = f if isinstance(f, DirectFile) else _Hashing(f)  # a DirectFile hashes what it writes
        with shard_save_settings():
            torch.save({"format": FORMAT, **state}, out)  # type: ignore[arg-type]  # a writable file
        f.flush()
        if not isinstance(f, DirectFile):
            os.fsync(f.fileno())
    finally:
        f.close()  # a DirectFile writes its tail and fsyncs here
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
    if isinstance(out, DirectFile):
        return out.checksum.hexdigest(), out.size
    return out.h.hexdigest(), out.n


def file_digest(path: str, like: str = "crc32:") -> tuple[str, int]:
    """Checksum (the kind ``like`` is, :class:`Checksum`) and size of the file at ``path``, read 8 MiB at
    a time."""
    h, n = Checksum(like), 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


