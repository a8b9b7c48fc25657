"""Parameter ownership: every parameter is tagged replicated, sharded or tied, and reductions read the tag.

Three kinds, each saying how the copies of one full-model parameter relate
across the ranks that hold them (within a bundle; bundles are always exact
copies and are averaged by the data groups)::

    Replicated()       every rank of the stage group holds the whole tensor; the
                       replicas of a row group average their gradients, tensor
                       ranks already hold equal gradients (each counts 1/T in norms)
    Sharded(dim)       each tensor rank holds slice t of ``dim`` (the tensor group
                       splits it); averaged over rows like a replicated one, never
                       reduced over the tensor group; norms add every slice once
    Tied(name, stages) one parameter held by several stages (GPT's input embedding
                       and output layer); their gradients are *summed* over the
                       tied communicator; it counts once (on its first stage) in
                       norms, checkpoints and gathering

The tag lives on the parameter object (:func:`tag` / :func:`owner_of`), as
Megatron marks ``tensor_model_parallel`` on its parameters, so it travels with
the module into any stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = ["Replicated", "Sharded", "Tied", "Ownership", "Tie", "cut", "join", "tag", "owner_of", "shard_of"]


@dataclass(frozen=True)
class Replicated:
    """The whole tensor on every rank of the stage group."""

    def describe(self) -> str:
        return "replicated"


@dataclass(frozen=True)
class Sharded:
    """Tensor rank ``t`` of ``size`` holds slice ``t`` of dimension ``dim`` (equal slices).

    ``parts > 1``: the dimension is ``parts`` equal blocks (e.g. GPT-2's fused
    query | key | value projection) and the rank holds slice ``t`` of *each*
    block, side by side: :func:`cut` and :func:`join` are the one definition.

    ``pad > 0`` (with ``parts == 1``): the dimension is padded with ``pad`` zero
    rows at its end so that it divides by ``size`` (a vocabulary of 50,257 over
    2 ranks, as Megatron pads it); the padding belongs to no model: :func:`join`
    drops it, :func:`cut` adds it, checkpoints record the unpadded shape.
    """

    dim: int
    size: int
    index: int
    parts: int = 1
    pad: int = 0

    def describe(self) -> str:
        blocks = f", in each of {self.parts} blocks" if self.parts > 1 else ""
        padded = f", {self.pad} padding row(s) at the end" if self.pad else ""
        return f"sharded on dim {self.dim} ({self.index + 1} of {self.size}{blocks}{padded})"


def cut(full: torch.Tensor, shard: Optional[Sharded]) -> torch.Tensor:
    """The slice of the whole tensor ``full`` that ``shard`` holds (``full`` itself when None)."""
    if shard is None:
        return full
    if shard.pad:
        shape = list(full.shape)
        shape[shard.dim] = shard.pad
        full = torch.cat([full, full.new_zeros(shape)], shard.dim)
    blocks = full.chunk(shard.parts, shard.dim)
    n = blocks[0].shape[shard.dim] // shard.size
    return torch.cat([b.narrow(shard.dim, n * shard.index, n) for b in blocks], shard.dim)


def join(pieces: list[torch.Tensor], dim: int, parts: int = 1, pad: int = 0) -> torch.Tensor:
    """The whole tensor from every tensor rank's slice, in rank order (inverse of :func:`cut`)."""
    if parts == 1:
        whole = torch.cat(pieces, dim)
        return whole.narrow(dim, 0, whole.shape[dim] - pad) if pad else whole
    split = [p.chunk(parts, dim) for p in pieces]
    return torch.cat([split[r][b] for b in range(parts) for r in range(len(pieces))], dim)


@dataclass(frozen=True)
class Tied:
    """One parameter held by ``stages``; ``name`` is its full name on the first of them."""

    name: str
    stages: tuple[int, ...]
    shard: Optional[Sharded] = None  # a tied parameter may also be split over the tensor group

    @property
    def first(self) -> int:
        return min(self.stages)

    def describe(self) -> str:
        return f"tied to {self.name} (stages {', '.join(map(str, self.stages))})"


Ownership = Union[Replicated, Sharded, Tied]

_ATTR = "_hvdhybrid_owner"


@dataclass(frozen=True)
class Tie:
    """A model's declaration that stages hold one shared parameter, under a full name each.

    Example: ``Tie({0: "wte.weight", 3: "lm_head.weight"})``: stage 0's
    ``wte.weight`` and stage 3's ``lm_head.weight`` are one parameter.
    """

    names: dict[int, str]

    def __post_init__(self) -> None:
        if len(self.names) < 2:
            raise ValueError(f"a tie needs at least two stages, got {self.names}")

    @property
    def stages(self) -> tuple[int, ...]:
        return tuple(sorted(self.names))

    @property
    def name(self) -> str:
        """The canonical name: the one on the first stage."""
        return self.names[min(self.names)]

    def ownership(self) -> Tied:
        return Tied(self.name, self.stages)


def tag(param: torch.Tensor, owner: Ownership) -> torch.Tensor:
    """Mark ``param`` with its ownership; returns it."""
    setattr(param, _ATTR, owner)
    return param


def owner_of(param: torch.Tensor) -> Ownership:
    """The tag of ``param``; untagged parameters are replicated."""
    owner: Ownership = getattr(param, _ATTR, Replicated())
    return owner


def shard_of(owner: Ownership) -> Optional[Sharded]:
    """The slice a rank holds: a sharded parameter's, a tied one's if it is sharded too, else None."""
    if isinstance(owner, Sharded):
        return owner
    if isinstance(owner, Tied):
        return owner.shard
    return None
