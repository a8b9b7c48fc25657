"""Checkpoints: per-rank shards written atomically, a manifest with checksums, a `latest` pointer.

On disk, under ``OUT/checkpoints/``::

    step-000020/stage-000.pt    one file per stage (per tensor rank: stage-000-t01.pt),
    step-000020/stage-001.pt    written by bundle 0's replica 0: parameters, buffers and
                                optimizer state by full-model name (a tied parameter once)
    step-000020/common.pt       step, sampler position, RNG states, optimizer hyperparameters
    step-000020/manifest.json   written by rank 0 once every file is on disk: step, model,
                                layout, checksum and size of every file, and for every name
                                the file(s) holding it with its global shape and slice
    latest                      the name of the newest complete checkpoint, updated last

Because names, not ranks, key the contents, any layout can load any
checkpoint (:mod:`state` does the resharding).

A checkpoint is *complete* when its manifest exists and every shard matches its
checksum. Every file is written to a temporary name, fsynced, and renamed, so
a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import InputError
from .shard_file import FORMAT, checksum, encode_shard, file_digest, fsync_dir, write_shard

__all__ = ["CheckpointError", "Manifest", "atomic_write", "step_dir",
           "write_manifest", "find_complete", "verify", "prune", "encode_shard",
           "save_collective", "resolve_resume", "load_file", "write_shard", "file_digest", "commit", "Entry",
           "committed", "checksum"]


class CheckpointError(InputError):
    """A checkpoint that cannot be used: missing, corrupt, truncated, or from another run."""


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:06d}")


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


@dataclass(frozen=True)
class Manifest:
    step: int
    model: str
    world_size: int
    widths: tuple[int, ...]
    shards: dict[str, tuple[str, int]]  # file name -> (checksum, size)
    tensor: int = 1
    #: full name -> pieces: {"file", "kind" (param/buffer), "shape" (global), "dim", "start", "stop",
    #: "parts" (the dim is that many blocks; start/stop are within each block)}
    names: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    placement: tuple[int, ...] = ()
    #: --zero: full name -> optimizer-state pieces, each a parameter's slice as above plus "flat" (the
    #: range [a, b) of that slice, flattened) and "at" (where it starts in its file's share tensors)
    optim: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "step": self.step, "model": self.model,
                           "world_size": self.world_size, "widths": list(self.widths),
                           "tensor": self.tensor, "placement": list(self.placement),
                           "shards": {k: {"checksum": h, "bytes": n} for k, (h, n) in self.shards.items()},
                           "names": self.names, "optim": self.optim}, indent=1)

    @classmethod
    def read(cls, path: str) -> Manifest:
        try:
            with open(path) as f:
                d = json.load(f)
            if d.get("format") != FORMAT:
                raise CheckpointError(
                    f"checkpoint {os.path.dirname(path)} has format {d.get('format')}, this "
                    f"hvdhybrid reads format {FORMAT} (by-name checkpoints); start a new run")
            return cls(int(d["step"]), str(d["model"]), int(d["world_size"]),
                       tuple(int(w) for w in d["widths"]),
                       {k: (str(v.get("checksum", v.get("sha256"))), int(v["bytes"]))  # sha256: before 12-07
                        for k, v in d["shards"].items()},
                       int(d.get("tensor", 1)), dict(d.get("names", {})),
                       tuple(int(p) for p in d.get("placement", ())), dict(d.get("optim", {})))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"unreadable manifest {path}: {e}") from None


def write_manifest(root: str, manifest: Manifest) -> None:
    """Write the manifest, then point ``latest`` at it (the commit point of a checkpoint)."""
    d = step_dir(root, manifest.step)
    atomic_write(os.path.join(d, "manifest.json"), manifest.to_json().encode())
    atomic_write(os.path.join(root, "latest"), os.path.basename(d).encode() + b"\n")


def verify(path: str) -> Manifest:
    """Check a checkpoint directory: manifest present, every shard there with its checksum.

    Raises:
        CheckpointError: naming the first missing, truncated or corrupt file.
    """
    mpath = os.path.join(path, "manifest.json")
    if not os.path.exists(mpath):
        raise CheckpointError(f"checkpoint {path} is incomplete (no manifest.json)")
    m = Manifest.read(mpath)
    for name, (digest, size) in sorted(m.shards.items()):
        f = os.path.join(path, name)
        try:
            got, n = file_digest(f, like=digest)
        except OSError:
            raise CheckpointError(f"checkpoint {path} lacks shard {name}") from None
        if n != size:
            raise CheckpointError(f"checkpoint shard {f} is truncated ({n} of {size} bytes)")
        if got != digest:
            raise CheckpointError(f"checkpoint shard {f} is corrupt (checksum mismatch)")
    return m


def find_complete(root: str) -> tuple[Optional[str], list[str]]:
    """The newest complete checkpoint under ``root`` and warnings about the ones skipped."""
    if not os.path.isdir(root):
        return None, []
    warnings: list[str] = []
    for name in sorted((n for n in os.listdir(root) if n.startswith("step-")), reverse=True):
        path = os.path.join(root, name)
        try:
            verify(path)
            return path, warnings
        except CheckpointError as e:
            warnings.append(f"skipping {e}")
    return None, warnings


def newest_checkpoint(where: str) -> Optional[str]:
    """The checkpoint ``where`` names: a run's ``--out`` or its ``checkpoints/`` (the newest complete
    one there), or one ``step-NNNNNN`` directory; None when there is none."""
    if os.path.isdir(os.path.join(where, "checkpoints")):
        where = os.path.join(where, "checkpoints")
    if os.path.isfile(os.path.join(where, "manifest.json")):
        return where
    return find_complete(where)[0]


def committed(root: str) -> list[str]:
    """The ``step-*`` directories under ``root`` that have their manifest, newest first (their files'
    checksums are not read: :func:`find_complete` does that)."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted((n for n in names if n.startswith("step-") and
                   os.path.exists(os.path.join(root, n, "manifest.json"))), reverse=True)


def prune(root: str, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (and incomplete older ones)."""
    names = sorted((n for n in os.listdir(root) if n.startswith("step-")), reverse=True)
    complete = committed(root)
    if not complete:
        return
    keep_set = set(complete[:keep])
    oldest_kept = min(keep_set)
    for n in names:
        if n not in keep_set and n < oldest_kept:
            trash = os.path.join(root, f".deleting-{n}")  # gone at once: never a half-deleted step-*
            try:
                os.replace(os.path.join(root, n), trash)
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)


def load_file(path: str, name: str) -> dict[str, Any]:
    """One file of a verified checkpoint directory."""
    f = os.path.join(path, name)
    try:
        state: dict[str, Any] = torch.load(f, map_location="cpu", weights_only=False, mmap=True)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot load checkpoint shard {f}: {e}") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint shard {f} has format {state.get('format')}, expected {FORMAT}")
    return state


def save_collective(world: Any, root: str, step: int, manifest: Manifest,
                    files: dict[str, dict[str, Any]], names: dict[str, list[dict[str, Any]]],
                    keep: int, after_shard: Any = None,
                    optim: Optional[dict[str, list[dict[str, Any]]]] = None) -> str:
    """Every rank writes its files (maybe none); rank 0 commits the manifest and ``latest``; collective.

    Args:
        manifest: the run's layout facts (its ``shards`` and ``names`` are filled in here).
        files: this rank's files, name -> contents.
        names: this rank's entries of the name map (full name -> pieces).
        optim: this rank's entries of the optimizer-state share map (``--zero``).

    Returns:
        The checkpoint directory.
    """
    d = step_dir(root, step)
    os.makedirs(d, exist_ok=True)
    written = []
    for name, state in sorted(files.items()):
        written.append((name, *write_shard(os.path.join(d, name), state)))
    if after_shard is not None:  # failure tests: die with the shard written, the manifest not
        after_shard()
    entries = world.gather((written, names, optim or {}), root=0)
    if world.Get_rank() == 0:
        commit(root, step, manifest, entries, keep)
    world.Barrier()  # nobody moves on before the checkpoint is committed
    return d


Entry = tuple[list[tuple[str, str, int]], dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]
"""What one rank wrote of a checkpoint: its files (name, checksum, size), its name map and share map."""


def commit(root: str, step: int, manifest: Manifest, entries: list[Entry], keep: int) -> None:
    """Rank 0, once every rank's files are on disk: the manifest from every rank's ``entries``, then
    ``latest`` (the commit point), then the older checkpoints beyond ``keep`` are pruned."""
    shards = {n: (h, size) for ws, _, _ in entries for n, h, size in ws}
    all_names: dict[str, list[dict[str, Any]]] = {}
    all_optim: dict[str, list[dict[str, Any]]] = {}
    for _, ns, os_ in entries:
        for k, pieces in ns.items():
            all_names.setdefault(k, []).extend(pieces)
        for k, pieces in os_.items():
            all_optim.setdefault(k, []).extend(pieces)
    for pieces in all_names.values():
        pieces.sort(key=lambda p: (p.get("start") or 0))
    for pieces in all_optim.values():
        pieces.sort(key=lambda p: (p.get("start") or 0, p["flat"][0]))
    m = Manifest(step, manifest.model, manifest.world_size, manifest.widths, shards,
                 manifest.tensor, all_names, manifest.placement, all_optim)
    write_manifest(root, m)
    prune(root, keep)


def resolve_resume(world: Any, where: str) -> tuple[Optional[str], list[str], Optional[str]]:
    """Pick the checkpoint to resume from (rank 0 decides, every rank learns it).

    ``where`` is a run's checkpoint root (the newest complete one is taken) or
    one ``step-*`` directory (which must be complete).

    Returns:
        (directory or None, warnings about skipped checkpoints, error message or None).
    """
    result: tuple[Optional[str], list[str], Optional[str]] = (None, [], None)
    if world.Get_rank() == 0:
        if os.path.basename(os.path.normpath(where)).startswith("step-"):
            try:
                verify(where)
                result = (where, [], None)
            except CheckpointError as e:
                result = (None, [], str(e))
        else:
            path, warnings = find_complete(where)
            result = (path, warnings, None)
    out: tuple[Optional[str], list[str], Optional[str]] = world.bcast(result, root=0)
    return out
