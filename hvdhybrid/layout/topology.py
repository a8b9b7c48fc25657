"""Pure rank arithmetic: world size + bundle shape + tensor size -> coordinates and group members.

No MPI here: everything is a function of integers, so it is tested in one
process for worlds of thousands of ranks.

A *bundle* is one model replica. Its ranks form *stage groups* (one per
pipeline position; the :class:`~hvdhybrid.layout.placement.Placement` says which model
stages each runs). Stage group ``s`` has ``widths[s] x tensor`` ranks: its
rows of the batch are split ``widths[s]`` ways (*replicas*), and each
replica's tensors are split ``tensor`` ways (*tensor ranks*). Ranks are
numbered bundle-major, then stage, then replica, then tensor rank (fastest,
so a tensor group is adjacent ranks)::

    world 8, bundle shape (1, 3)  ->  2 bundles of 4 ranks

    rank      0  1  2  3 | 4  5  6  7
    bundle    0  0  0  0 | 1  1  1  1
    stage     0  1  1  1 | 0  1  1  1
    replica   0  0  1  2 | 0  0  1  2

    bundle groups: [0, 1, 2, 3], [4, 5, 6, 7]
    stage groups:  [0], [1, 2, 3], [4], [5, 6, 7]
    row groups:    the same (one tensor rank: a stage group splits rows only)
    data groups:   [0, 4], [1, 5], [2, 6], [3, 7]   (same stage+replica+tensor, across bundles)

    world 8, 2 stages x tensor 2  ->  2 bundles of 4 ranks

    rank      0  1  2  3 | 4  5  6  7
    bundle    0  0  0  0 | 1  1  1  1
    stage     0  0  1  1 | 0  0  1  1
    tensor    0  1  0  1 | 0  1  0  1

    stage groups:  [0, 1], [2, 3], [4, 5], [6, 7]   (= tensor groups: they split tensors)
    row groups:    [0], [1], [2], [3], ...           (gradients averaged over rows: none here)
    data groups:   [0, 4], [1, 5], [2, 6], [3, 7]
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ..errors import InputError

__all__ = ["LayoutError", "Layout", "RankCoord", "parse_bundle_shape"]


class LayoutError(InputError):
    """A requested layout does not fit the world; the message says what would."""


@dataclass(frozen=True)
class RankCoord:
    """Where one rank sits: bundle, stage group, replica (rows) and tensor rank (tensors)."""

    rank: int
    bundle: int
    stage: int
    replica: int
    tensor: int = 0

    def tag(self) -> str:
        return f"rank {self.rank} | bundle {self.bundle} | stage {self.stage}"


def parse_bundle_shape(text: str) -> tuple[int, ...]:
    """Parse ``"2,1"`` into stage widths ``(2, 1)``.

    Raises:
        LayoutError: for anything that is not a comma-separated list of positive integers.
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        widths = tuple(int(p) for p in parts)
    except ValueError:
        raise LayoutError(
            f"bundle shape {text!r} is not a comma-separated list of integers; "
            "write e.g. 2,1 for 2 front ranks and 1 rear rank"
        ) from None
    if not widths or any(w < 1 for w in widths):
        raise LayoutError(f"bundle shape {text!r} needs widths >= 1; write e.g. 2,1")
    return widths


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Layout:
    """World size, bundle shape and tensor size; every coordinate and group follows from them.

    Args:
        world_size: number of ranks in ``COMM_WORLD``.
        widths: row replicas per stage group, one entry per stage group of a bundle.
        tensor: ranks that split each replica's tensors (1: no tensor parallelism).

    Raises:
        LayoutError: when ``world_size`` is not a multiple of the bundle size.
    """

    world_size: int
    widths: tuple[int, ...]
    tensor: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise LayoutError(f"world size must be >= 1, got {self.world_size}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise LayoutError(f"every stage needs at least one rank, got widths {list(self.widths)}")
        if self.tensor < 1:
            raise LayoutError(f"--tensor must be >= 1, got {self.tensor}")
        size = self.bundle_size
        if self.world_size % size:
            fits = [size * k for k in (1, 2, 4) if size * k != self.world_size]
            shape = f"stage widths {'+'.join(map(str, self.widths))}"
            if self.tensor > 1:
                shape += f" x tensor {self.tensor}"
            raise LayoutError(
                f"world size {self.world_size} is not divisible by bundle size {size} "
                f"({shape}); launch with -np {' or -np '.join(map(str, fits))}, or use a bundle "
                f"of one of {_divisors(self.world_size)} ranks"
            )

    @classmethod
    def pipeline(cls, world_size: int, stages: int, tensor: int = 1) -> Layout:
        """A chain of ``stages`` stage groups of one replica (of ``tensor`` ranks) per bundle."""
        if stages < 1:
            raise LayoutError(f"--stages must be >= 1, got {stages}")
        return cls(world_size, (1,) * stages, tensor)

    # -- sizes ---------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.widths)

    @property
    def bundle_size(self) -> int:
        return sum(self.widths) * self.tensor

    @property
    def num_bundles(self) -> int:
        return self.world_size // self.bundle_size

    @cached_property
    def _offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for w in self.widths:
            out.append(acc)
            acc += w * self.tensor
        return tuple(out)

    # -- coordinates ---------------------------------------------------------
    def coord(self, rank: int) -> RankCoord:
        """Coordinates of ``rank``.

        Raises:
            LayoutError: if ``rank`` is outside the world.
        """
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is outside a world of {self.world_size}")
        bundle, local = divmod(rank, self.bundle_size)
        stage = 0
        while stage + 1 < self.num_stages and self._offsets[stage + 1] <= local:
            stage += 1
        replica, tensor = divmod(local - self._offsets[stage], self.tensor)
        return RankCoord(rank, bundle, stage, replica, tensor)

    def rank_of(self, bundle: int, stage: int, replica: int, tensor: int = 0) -> int:
        """Inverse of :meth:`coord`."""
        if not (0 <= bundle < self.num_bundles and 0 <= stage < self.num_stages
                and 0 <= replica < self.widths[stage] and 0 <= tensor < self.tensor):
            raise LayoutError(
                f"no rank at bundle {bundle}, stage {stage}, replica {replica}, tensor {tensor} "
                f"in {self.describe()}"
            )
        return bundle * self.bundle_size + self.bundle_local_rank(stage, replica, tensor)

    def bundle_local_rank(self, stage: int, replica: int, tensor: int = 0) -> int:
        """Rank inside the bundle communicator (same for every bundle)."""
        return self._offsets[stage] + replica * self.tensor + tensor

    # -- groups --------------------------------------------------------------
    def bundle_members(self, bundle: int) -> list[int]:
        start = bundle * self.bundle_size
        return list(range(start, start + self.bundle_size))

    def stage_members(self, bundle: int, stage: int) -> list[int]:
        """Every rank of one stage group of one bundle (replicas x tensor ranks)."""
        return [self.rank_of(bundle, stage, r, t) for r in range(self.widths[stage])
                for t in range(self.tensor)]

    def row_members(self, bundle: int, stage: int, tensor: int) -> list[int]:
        """The replicas of a stage group that hold the same tensor shard: they split rows."""
        return [self.rank_of(bundle, stage, r, tensor) for r in range(self.widths[stage])]

    def tensor_members(self, bundle: int, stage: int, replica: int) -> list[int]:
        """The tensor ranks of one replica: they split its tensors."""
        return [self.rank_of(bundle, stage, replica, t) for t in range(self.tensor)]

    def data_members(self, stage: int, replica: int, tensor: int = 0) -> list[int]:
        """The same (stage, replica, tensor rank) in every bundle."""
        return [self.rank_of(b, stage, replica, tensor) for b in range(self.num_bundles)]

    def all_data_groups(self) -> list[list[int]]:
        """Every data group, in bundle-local rank order (the same list on every rank)."""
        return [self.data_members(s, r, t) for s in range(self.num_stages)
                for r in range(self.widths[s]) for t in range(self.tensor)]

    def describe(self) -> str:
        tp = f" x tensor {self.tensor}" if self.tensor > 1 else ""
        return (f"{self.num_bundles} bundle(s) x stages of width "
                f"{','.join(map(str, self.widths))}{tp} = {self.world_size} ranks")
