"""An engine's state to and from disk and to rank 0: save and resume checkpoints, gather parameters.

The loop's facts (step, sampler position) come in as arguments, the rest
(model name, checkpoints kept, where) from the engine's config; what the loop
must take back (the step and sampler position resumed) comes out as a :class:`Resumed`. What a
checkpoint holds, by full name, is :mod:`state`; its files are :mod:`checkpoint`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..log import get_logger
from ..parallel.ownership import Sharded, join, owner_of, shard_of
from .background_save import BackgroundWriter
from .checkpoint import CheckpointError, Manifest, load_file, resolve_resume, save_collective
from .engine import Engine
from .faults import inject_failure
from .state import COMMON, NamedState, check_model, rng_state, set_rng_state, stage_file

__all__ = ["Resumed", "gather_parameters", "named_parameters", "resume", "save"]


@dataclass(frozen=True)
class Resumed:
    """What a resume hands back to the loop: the directory loaded, its step and sampler position."""

    path: str
    step: int
    sampler: Optional[dict[str, int]]


def save(engine: Engine, step: int, sampler: Optional[dict[str, int]],
         writer: Optional[BackgroundWriter] = None) -> str:
    """Collective: write ``step``'s checkpoint under ``--out``/checkpoints, by name, once per stage.

    Args:
        sampler: the sampler's state at ``step`` (saved for the resume to continue from).
        writer: write in the background (a copy of the state, written by its thread; see
            :mod:`background_save`); None: write now, and return once it is committed.

    Returns:
        The checkpoint's directory.
    """
    groups, state, precision = engine.groups, engine.state, engine.precision
    run = engine.cfg.run
    model_name, out = run.model_name, run.out
    lay, c, world = groups.layout, groups.coord, groups.world
    zero = engine.sync.zero
    files, names = ({}, {}) if (c.bundle, c.replica) != (0, 0) else state.files(c.tensor, lay.tensor)
    optim: dict[str, list[dict[str, Any]]] = {}
    if zero is not None and c.replica == 0:  # every member of replica 0's data groups writes its share
        first = stage_file(min(state.named_params), c.tensor, lay.tensor)[:-len(".pt")]
        fname = f"zero-{first}-b{c.bundle:03d}.pt"
        files[fname], optim = state.share_file(zero, fname)
    rngs = world.gather(rng_state(), root=0)
    if world.Get_rank() == 0:
        files[COMMON] = {"model": model_name, "step": step, "rng": rngs, "sampler": sampler,
                         "hyper": state.hyperparameters(),
                         "scaler": precision.scaler.state() if precision.scaler else None,
                         "extra": engine.checkpoint_extra}
    facts = Manifest(step, model_name, lay.world_size, lay.widths, {}, lay.tensor,
                     {}, engine.placement.positions)
    assert out is not None
    root, rank = os.path.join(out, "checkpoints"), world.Get_rank()
    if writer is not None:
        nonce = world.bcast(os.urandom(4).hex() if rank == 0 else None, root=0)
        return writer.submit(root, step, facts, files, names, optim, run.keep, nonce,
                             lambda: inject_failure(rank, step, "ckpt"))
    path = save_collective(world, root, step, facts, files, names, run.keep,
                           lambda: inject_failure(rank, step, "ckpt"), optim)
    if world.Get_rank() == 0:
        get_logger().info(f"checkpoint step {step} written to {path}")
    return path


def resume(engine: Engine, where: str) -> Optional[Resumed]:
    """Collective: load the newest complete checkpoint under ``where`` (or that one directory).

    The checkpoint may come from any layout: parameters and optimizer state
    are found by name and resharded. RNG states come back only when the
    layout is the same (then the resume is exact bit for bit).

    Returns:
        The directory loaded with its step and sampler state, or None when there is none yet.

    Raises:
        CheckpointError: the named checkpoint is corrupt, or belongs to another run/model.
    """
    world, lay = engine.groups.world, engine.groups.layout
    path, warnings, error = resolve_resume(world, where)
    if world.Get_rank() == 0:
        for w in warnings:
            get_logger().warning(w)
    if error:
        raise CheckpointError(error)
    if path is None:
        return None
    manifest = Manifest.read(os.path.join(path, "manifest.json"))
    common = load_file(path, COMMON)
    check_model(engine.cfg.run.model_name, str(common["model"]))
    engine.state.load(path, manifest, common["hyper"])
    same = (manifest.world_size, manifest.widths, manifest.tensor, manifest.placement) == \
        (lay.world_size, lay.widths, lay.tensor, engine.placement.positions)
    if same:
        set_rng_state(common["rng"][world.Get_rank()])
    if engine.sync.zero is not None:  # every member keeps its share of the whole state it read
        engine.sync.zero.absorb_loaded_state()
    else:
        engine.sync.broadcast_optimizer_state(engine.optimizer)  # every copy continues from bundle 0's
    scaler = engine.precision.scaler
    if scaler is not None and common.get("scaler"):
        scaler.load_state(common["scaler"])
    return Resumed(path, int(common["step"]), common["sampler"])


def named_parameters(state: NamedState) -> dict[str, torch.Tensor]:
    """This rank's parameters by full-model name (CPU copies; a tie under each holder's name)."""
    return {n: p.detach().cpu().clone()
            for names in state.named_params.values() for n, p in names.items()}


def gather_parameters(engine: Engine) -> Optional[dict[str, torch.Tensor]]:
    """Collective: the whole model's parameters and persistent buffers on world rank 0, shards joined
    (None elsewhere)."""
    c = engine.groups.coord
    mine: dict[str, tuple[torch.Tensor, Optional[Sharded]]] = {}
    if (c.bundle, c.replica) == (0, 0):
        for names in engine.state.named_params.values():
            for n, p in names.items():
                shard = shard_of(owner_of(p))
                if shard is None and c.tensor != 0:
                    continue
                mine[n] = (p.detach().cpu().clone(), shard)
        if c.tensor == 0:  # buffers (BatchNorm's statistics) are whole on every tensor rank
            for names in engine.state.named_buffers.values():
                mine.update((n, (b.detach().cpu().clone(), None)) for n, b in names.items())
    parts = engine.groups.world.gather(mine, root=0)
    if parts is None:
        return None
    pieces: dict[str, list[tuple[int, torch.Tensor, Optional[Sharded]]]] = {}
    for part in parts:
        for n, (t, shard) in part.items():
            pieces.setdefault(n, []).append((shard.index if shard else 0, t, shard))
    out: dict[str, torch.Tensor] = {}
    for n, ps in pieces.items():
        ps.sort(key=lambda x: x[0])
        shard = ps[0][2]
        out[n] = ps[0][1] if shard is None else join([t for _, t, _ in ps], shard.dim, shard.parts, shard.pad)
    return out
