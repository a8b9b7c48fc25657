"""Placement: which stage group of a bundle runs each model stage (identity, looped, contiguous).

A bundle's ranks form ``P`` stage groups, its *positions* in the pipeline.
With the identity placement each model stage has a position of its own. With
more model stages than positions, a position runs several stages, and the
schedule interleaves their actions (see :mod:`hvdhybrid.pipeline.schedules`). Four model
stages on two positions::

    identity (4 positions):  position 0: stage 0 | 1: stage 1 | 2: stage 2 | 3: stage 3
    looped:                  position 0: stages 0, 2      position 1: stages 1, 3
    contiguous:              position 0: stages 0, 1      position 1: stages 2, 3
    v:                       position 0: stages 0, 3      position 1: stages 1, 2

Looped (interleaved) placement sends every edge of a chain to the other
position, so both positions start working after one forward instead of after
half the model; contiguous keeps most edges local (no transfer) instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..errors import InputError

__all__ = ["PlacementError", "Placement", "PLACEMENTS"]

PLACEMENTS = ("identity", "looped", "contiguous", "v")
"""Names that :meth:`Placement.parse` accepts besides an explicit list."""


class PlacementError(InputError):
    """A placement that leaves a position idle, names a position that does not exist, or cannot be parsed."""


def _check_counts(num_stages: int, num_positions: int) -> None:
    if num_stages < 1:
        raise PlacementError(f"a placement needs at least one stage, got {num_stages}")
    if num_positions < 1:
        raise PlacementError(f"a placement needs at least one position, got {num_positions}")
    if num_stages < num_positions:
        raise PlacementError(
            f"cannot place {num_stages} stages on {num_positions} positions: every position "
            f"needs a stage; use at most {num_stages} positions or split the model into "
            f"at least {num_positions} stages")


@dataclass(frozen=True)
class Placement:
    """Which stage group (pipeline position of a bundle's ranks) runs each model stage.

    Args:
        positions: ``positions[stage]`` is the index of the stage group that
            runs ``stage``. Every position from 0 to the largest one must run
            at least one stage.

    Raises:
        PlacementError: on an empty tuple, a negative or non-integer entry, or
            an unused position.
    """

    positions: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.positions, tuple):  # a list from a config file: freeze it
            object.__setattr__(self, "positions", tuple(self.positions))
        pos = self.positions
        if not pos:
            raise PlacementError("a placement needs at least one stage, got an empty list of positions")
        bad = [(s, p) for s, p in enumerate(pos) if not isinstance(p, int) or isinstance(p, bool) or p < 0]
        if bad:
            shown = ", ".join(f"stage {s} -> {p!r}" for s, p in bad)
            raise PlacementError(f"positions must be integers >= 0, got {shown} in {list(pos)}")
        unused = sorted(set(range(max(pos) + 1)) - set(pos))
        if unused:
            raise PlacementError(
                f"positions {unused} run no stage in placement {list(pos)}: every position from 0 "
                f"to {max(pos)} needs a stage; renumber the positions 0..{max(pos) - len(unused)} "
                "or use fewer stage groups")

    # -- constructors ------------------------------------------------------------
    @classmethod
    def identity(cls, num_stages: int) -> Placement:
        """Stage ``s`` on position ``s``: one stage per stage group.

        Args:
            num_stages: number of model stages (and positions), at least 1.

        Returns:
            The placement ``(0, 1, ..., num_stages - 1)``.

        Raises:
            PlacementError: if ``num_stages < 1``.
        """
        _check_counts(num_stages, 1)
        return cls(tuple(range(num_stages)))

    @classmethod
    def looped(cls, num_stages: int, num_positions: int) -> Placement:
        """Stage ``s`` on position ``s % num_positions`` (interleaved, as in Megatron's virtual stages).

        Args:
            num_stages: number of model stages, at least ``num_positions``
                (need not be a multiple of it: the first positions then run one more stage).
            num_positions: number of stage groups, at least 1.

        Returns:
            For 5 stages on 2 positions, ``(0, 1, 0, 1, 0)``.

        Raises:
            PlacementError: if ``num_positions < 1`` or ``num_stages < num_positions``.
        """
        _check_counts(num_stages, num_positions)
        return cls(tuple(s % num_positions for s in range(num_stages)))

    @classmethod
    def v(cls, num_stages: int, num_positions: int) -> Placement:
        """Two stages per position in a V: stage ``s`` on position ``s``, then back (``2P-1-s``), so
        the first position also runs the last stage (the ZB-V and V-Half schedules).

        Raises:
            PlacementError: unless ``num_stages == 2 * num_positions``.
        """
        _check_counts(num_stages, num_positions)
        if num_stages != 2 * num_positions:
            raise PlacementError(f"placement 'v' needs 2 stages per position ({2 * num_positions} for "
                                 f"{num_positions} positions), got {num_stages}; use --stages-per-rank 2")
        p = num_positions
        return cls(tuple(s if s < p else 2 * p - 1 - s for s in range(num_stages)))

    @classmethod
    def contiguous(cls, num_stages: int, num_positions: int) -> Placement:
        """Consecutive blocks of stages per position, as even as possible (earlier positions get the extra).

        Args:
            num_stages: number of model stages, at least ``num_positions``.
            num_positions: number of stage groups, at least 1.

        Returns:
            For 5 stages on 2 positions, ``(0, 0, 0, 1, 1)``.

        Raises:
            PlacementError: if ``num_positions < 1`` or ``num_stages < num_positions``.
        """
        _check_counts(num_stages, num_positions)
        q, r = divmod(num_stages, num_positions)
        out: list[int] = []
        for p in range(num_positions):
            out += [p] * (q + (1 if p < r else 0))
        return cls(tuple(out))

    @classmethod
    def parse(cls, text: str, num_stages: int, num_positions: int) -> Placement:
        """A placement from user text: a name from :data:`PLACEMENTS` or an explicit list.

        Args:
            text: ``"identity"``, ``"looped"``, ``"contiguous"``, or one position
                per stage separated by commas, e.g. ``"0,1,0,1"``.
            num_stages: number of model stages the placement must cover.
            num_positions: number of stage groups; each must get a stage.

        Returns:
            The placement.

        Raises:
            PlacementError: on an unknown name, an entry that is not an
                integer, a list of the wrong length, a position outside
                ``0..num_positions-1``, a position without a stage, or
                ``identity`` with as many positions as stages not given.
        """
        t = text.strip().lower()
        if t == "identity":
            if num_stages != num_positions:
                raise PlacementError(
                    f"placement 'identity' needs one position per stage, but there are {num_stages} "
                    f"stages and {num_positions} positions; use 'looped' or 'contiguous'")
            return cls.identity(num_stages)
        if t == "looped":
            return cls.looped(num_stages, num_positions)
        if t == "contiguous":
            return cls.contiguous(num_stages, num_positions)
        if t == "v":
            return cls.v(num_stages, num_positions)
        _check_counts(num_stages, num_positions)
        items = [x.strip() for x in t.split(",")]
        try:
            pos = tuple(int(x) for x in items)
        except ValueError:
            example = ",".join(str(s % num_positions) for s in range(num_stages))
            raise PlacementError(
                f"cannot read placement {text!r}: use one of {', '.join(PLACEMENTS)} or one position "
                f"per stage separated by commas, e.g. {example!r}") from None
        if len(pos) != num_stages:
            raise PlacementError(
                f"placement {text!r} gives {len(pos)} positions but the model has {num_stages} stages; "
                "give one position per stage")
        outside = sorted({p for p in pos if not 0 <= p < num_positions})
        if outside:
            raise PlacementError(
                f"placement {text!r} names positions {outside}, but there are {num_positions} "
                f"positions (0..{num_positions - 1})")
        unused = sorted(set(range(num_positions)) - set(pos))
        if unused:
            raise PlacementError(
                f"placement {text!r} gives no stage to positions {unused} of {num_positions}; "
                "every position needs a stage")
        return cls(pos)

    # -- queries -------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        """Number of model stages placed."""
        return len(self.positions)

    @property
    def num_positions(self) -> int:
        """Number of stage groups (positions) used."""
        return max(self.positions) + 1

    def stages_on(self, position: int) -> list[int]:
        """Model stages that ``position`` runs, ascending.

        Raises:
            PlacementError: if ``position`` does not exist.
        """
        if not 0 <= position < self.num_positions:
            raise PlacementError(f"position {position} does not exist; there are {self.num_positions}")
        return [s for s, p in enumerate(self.positions) if p == position]

    def position_of(self, stage: int) -> int:
        """The position that runs ``stage``.

        Raises:
            PlacementError: if ``stage`` does not exist.
        """
        if not 0 <= stage < self.num_stages:
            raise PlacementError(f"stage {stage} does not exist; the placement covers {self.num_stages}")
        return self.positions[stage]

    def groups_of(self, stages: Iterable[int]) -> tuple[int, ...]:
        """The positions (stage groups) that run ``stages``, ascending, each once."""
        return tuple(sorted({self.position_of(s) for s in stages}))

    def local_edge(self, src: int, dst: int) -> bool:
        """Whether stages ``src`` and ``dst`` run on the same position (their edge needs no transfer)."""
        return self.position_of(src) == self.position_of(dst)

    def describe(self) -> str:
        """One line, e.g. ``"stages 0,2 on position 0; 1,3 on position 1"``."""
        parts = [f"{','.join(map(str, self.stages_on(p)))} on position {p}"
                 for p in range(self.num_positions)]
        return ("stages " if self.num_stages > 1 else "stage ") + "; ".join(parts)
