"""Training state by full-model name: what a checkpoint holds, gathering it, and loading it into any layout.

Writers: in bundle 0, replica 0 of every stage group writes one file per
stage it runs (per tensor rank); a tied parameter is written by its first
stage only. Every entry is keyed by full name and records its global shape
and, for a sharded parameter, the slice it holds, so a loader with another
layout (stage count, stage widths, bundle count, tensor size, placement)
finds each of its names, joins the slices and cuts its own.

Optimizer state travels the same way: per parameter, by its full name
(SGD's momentum buffer, Adam's moments and step); tensors shaped like the
parameter are sliced like it. The hyperparameters of the optimizer's groups
(learning rate, ...) are in ``common.pt``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..parallel.ownership import Sharded, Tied, cut, join, owner_of, shard_of
from .checkpoint import CheckpointError, Manifest, load_file

__all__ = ["CheckpointReader", "NamedState", "stage_file", "COMMON", "rng_state", "set_rng_state",
           "check_model"]

COMMON = "common.pt"


def stage_file(stage: int, tensor_rank: int, tensor: int) -> str:
    return f"stage-{stage:03d}.pt" if tensor == 1 else f"stage-{stage:03d}-t{tensor_rank:02d}.pt"


def _piece(file: str, kind: str, t: torch.Tensor, shard: Optional[Sharded]) -> dict[str, Any]:
    shape = list(t.shape)
    if shard is None:
        return {"file": file, "kind": kind, "shape": shape, "dim": None, "start": None, "stop": None}
    n = t.shape[shard.dim]
    shape[shard.dim] = n * shard.size - shard.pad  # the global shape: without padding
    return {"file": file, "kind": kind, "shape": shape, "dim": shard.dim, "parts": shard.parts,
            "start": n * shard.index, "stop": n * (shard.index + 1), "pad": shard.pad}


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a checkpoint writes it: a tensor whose storage is exactly its bytes (a saved view would
    carry the whole storage it views). Itself when it is its storage's whole; a contiguous view (a
    parameter in ``--zero``'s flat buffer) as a tensor over the same memory, without a copy; else a
    compact copy. Writing is synchronous, so nothing is kept."""
    t = t.detach().cpu()
    whole = t.storage_offset() == 0 and t.is_contiguous() and \
        t.untyped_storage().nbytes() == t.numel() * t.element_size()
    if whole:
        return t
    if t.is_contiguous() and t.numel():
        try:
            return torch.from_numpy(t.numpy())  # the same memory, a storage of its own extent
        except TypeError:  # a dtype numpy lacks (bfloat16)
            pass
    return t.clone()


def _other_size(name: str, saved: torch.Tensor, mine: torch.Tensor) -> CheckpointError:
    return CheckpointError(
        f"the checkpoint's {name} has shape {tuple(saved.shape)}, this model's has {tuple(mine.shape)}: "
        "it is of another model size; resume with the model options it was trained with")


class CheckpointReader:
    """Whole tensors by full name from one checkpoint directory: every slice read once, joined."""

    def __init__(self, path: str, manifest: Manifest) -> None:
        self.path, self.manifest = path, manifest
        self._cache: dict[str, dict[str, Any]] = {}

    def read(self, f: str) -> dict[str, Any]:
        if f not in self._cache:
            self._cache[f] = load_file(self.path, f)
        return self._cache[f]

    def pieces(self, name: str) -> list[dict[str, Any]]:
        if name not in self.manifest.names:
            have = sorted(self.manifest.names)[:6]
            raise CheckpointError(f"the checkpoint has no {name!r} (it has {have}, ...): "
                                  "it belongs to another model or configuration")
        return self.manifest.names[name]

    def whole(self, name: str, section: str, key: Optional[str] = None) -> Any:
        """The value of ``name`` with its slices joined (state shaped like a slice is joined too)."""
        ps = self.pieces(name)
        vals = [self.read(p["file"])[section][name] for p in ps]
        if key is not None:
            vals = [v.get(key) for v in vals]
        dim = ps[0]["dim"]
        if dim is None:
            return vals[0]
        slice_shape = [[ps[i]["stop"] - ps[i]["start"] if j == dim else d
                        for j, d in enumerate(ps[i]["shape"])] for i in range(len(ps))]
        if all(torch.is_tensor(v) and list(v.shape) == sh for v, sh in zip(vals, slice_shape)):
            return join(vals, dim, int(ps[0].get("parts", 1)), int(ps[0].get("pad", 0)))
        return vals[0]  # a scalar-like state (Adam's step) rides with every slice alike

    def optimizer(self, name: str) -> dict[str, Any]:
        """``name``'s optimizer state, every tensor whole: from the parameter's file, or (``--zero``)
        joined from the shares of every member of its data group."""
        zs = self.manifest.optim.get(name)
        if not zs:
            st0 = self.read(self.pieces(name)[0]["file"])["optimizer"].get(name, {})
            return {k: self.whole(name, "optimizer", k) for k in st0}
        first = self.read(zs[0]["file"])
        out: dict[str, Any] = dict(first["scalars"])
        by_slice: dict[int, list[dict[str, Any]]] = {}
        for p in zs:
            by_slice.setdefault(p["start"] or 0, []).append(p)
        for k in first["share"]:
            slices = []
            for start in sorted(by_slice):
                group = by_slice[start]
                g0, dim = group[0], group[0]["dim"]
                shape = [g0["stop"] - g0["start"] if j == dim else d for j, d in enumerate(g0["shape"])]
                flat = torch.empty(int(torch.Size(shape).numel()))
                covered = 0
                for p in group:
                    a, b = p["flat"]
                    flat[a:b] = self.read(p["file"])["share"][k][p["at"]:p["at"] + b - a]
                    covered += b - a
                if covered != flat.numel():
                    raise CheckpointError(f"the checkpoint's optimizer state of {name} covers {covered} of "
                                          f"{flat.numel()} elements: a share file is missing from it")
                slices.append(flat.view(shape))
            dim = zs[0]["dim"]
            out[k] = slices[0] if dim is None else join(slices, dim, int(zs[0].get("parts", 1)),
                                                        int(zs[0].get("pad", 0)))
        return out

    def parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter of the checkpoint, whole, by full name (a tie once, under its first name)."""
        names = self.manifest.names
        return {n: self.whole(n, "params") for n, ps in names.items() if ps[0]["kind"] == "param"}


@dataclass
class NamedState:
    """One rank's parameters, buffers and optimizer state, by full-model name.

    Args:
        named_params: ``stage -> {full name: parameter}`` for this rank's stages.
        named_buffers: ``stage -> {full name: buffer}``.
        optimizer: the optimizer over those parameters.
    """

    named_params: dict[int, dict[str, torch.Tensor]]
    named_buffers: dict[int, dict[str, torch.Tensor]]
    optimizer: torch.optim.Optimizer

    # -- writing -------------------------------------------------------------
    def files(self, tensor_rank: int, tensor: int) -> tuple[dict[str, dict[str, Any]],
                                                          dict[str, list[dict[str, Any]]]]:
        """This rank's files (one per stage) and their entries of the manifest's name map."""
        files: dict[str, dict[str, Any]] = {}
        names: dict[str, list[dict[str, Any]]] = {}
        for s in sorted(self.named_params):
            fname = stage_file(s, tensor_rank, tensor)
            params: dict[str, torch.Tensor] = {}
            optim: dict[str, dict[str, Any]] = {}
            for n, p in self.named_params[s].items():
                owner = owner_of(p)
                if isinstance(owner, Tied) and owner.first != s:
                    continue  # written once, by the tie's first stage
                params[n] = _own(p)
                st = self.optimizer.state.get(p, {})  # type: ignore[call-overload]
                optim[n] = {k: (_own(v) if torch.is_tensor(v) else v) for k, v in st.items()}
                names[n] = [_piece(fname, "param", p, shard_of(owner))]
            buffers = {n: _own(b) for n, b in self.named_buffers[s].items()}
            for n, b in buffers.items():
                names[n] = [_piece(fname, "buffer", b, None)]
            files[fname] = {"params": params, "buffers": buffers, "optimizer": optim}
        return files, names

    def share_file(self, zero: Any, fname: str) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """``--zero``: this member's share of the optimizer state as one file (each state tensor once, as
        the optimizer holds it), and the pieces of it that belong to each full name."""
        st = zero.inner.state.get(zero.part, {})
        share = {k: _own(v) for k, v in st.items()
                 if torch.is_tensor(v) and v.dim() == 1 and zero.n and v.numel() == zero.n}
        offset = {id(p): off for p, off in zip(zero.params, zero.offsets)}
        names: dict[str, list[dict[str, Any]]] = {}
        for s in sorted(self.named_params):
            for n, p in self.named_params[s].items():
                owner = owner_of(p)
                if (isinstance(owner, Tied) and owner.first != s) or id(p) not in offset:
                    continue  # written once, by the tie's first stage; or frozen (no optimizer state)
                off = offset[id(p)]
                a, b = max(off, zero.lo), min(off + p.numel(), zero.hi)
                if a < b:
                    names[n] = [{**_piece(fname, "optim", p, shard_of(owner)),
                                 "flat": [a - off, b - off], "at": a - zero.lo}]
        return {"share": share, "scalars": {k: v for k, v in st.items() if k not in share}}, names

    def hyperparameters(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    # -- reading -------------------------------------------------------------
    def load(self, path: str, manifest: Manifest, hyper: list[dict[str, Any]]) -> None:
        """Fill this rank's parameters, buffers and optimizer state from checkpoint ``path``.

        Raises:
            CheckpointError: a name this model needs is missing, or its shape differs.
        """
        r = CheckpointReader(path, manifest)
        whole = r.whole

        for s in sorted(self.named_params):
            # one Parameter under several names (a tie inside the stage): read it under whichever
            # name the checkpoint has (a checkpoint of another layout may hold the tie once)
            aliases: dict[int, list[str]] = {}
            for n, p in self.named_params[s].items():
                owner = owner_of(p)
                aliases.setdefault(id(p), []).append(owner.name if isinstance(owner, Tied) else n)
            done: set[int] = set()
            for p in self.named_params[s].values():
                if id(p) in done:
                    continue
                done.add(id(p))
                owner = owner_of(p)
                names = aliases[id(p)]
                src = next((a for a in names if a in manifest.names), names[0])
                full = whole(src, "params")
                got = cut(full, shard_of(owner))
                if got.shape != p.shape:
                    raise _other_size(src, full, p)
                with torch.no_grad():
                    p.copy_(got)
                state: dict[str, Any] = {}
                for k, v in r.optimizer(src).items():
                    if torch.is_tensor(v) and k != "step":  # Adam keeps its step count on the CPU
                        if v.shape == full.shape and v.dim() > 0:
                            v = cut(v, shard_of(owner))
                        v = v.clone().to(p.device)
                    state[k] = v
                if state:
                    self.optimizer.state[p] = state  # type: ignore[index]
            for n, b in self.named_buffers[s].items():
                saved = whole(n, "buffers")
                if saved.shape != b.shape:
                    raise _other_size(f"buffer {n}", saved, b)
                with torch.no_grad():
                    b.copy_(saved)
        for g, h in zip(self.optimizer.param_groups, hyper):
            g.update({k: v for k, v in h.items() if k != "params"})


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])


def check_model(name: str, saved: str) -> None:
    if saved != name:
        raise CheckpointError(f"the checkpoint is of model {saved!r}, this run trains {name!r}")
