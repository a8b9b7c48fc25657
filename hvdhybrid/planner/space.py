"""The layouts the planner weighs: every choice of the knobs that fits a world (pure arithmetic).

A :class:`Choice` is what ``--layout auto`` sets: tensor size, stage groups
and their widths (``--bundle-shape``), model stages per group (placement
``auto``: looped, or a V for zbv/vhalf), schedule, microbatches, ``--zero``
and ``--recompute``; across hosts, also how ranks are dealt onto them
(``--map-by``, which the launcher takes). Bundles are what is left of the
world. :func:`choices` lists every one that the world divides, that the rows
of one pass split evenly over (bundles x microbatches, and a group's ranks),
and whose stage count the model has layers for; the search proves each with
the schedule simulator and times it (:mod:`.search`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

__all__ = ["Choice", "choices", "divisors", "shapes"]

#: schedules over one stage per stage group, and (stages per rank 2) the looped and V ones
FLAT = ("gpipe", "1f1b", "zb1")
VIRTUAL = ("interleaved", "zbv", "vhalf")


@dataclass(frozen=True)
class Choice:
    """One layout and its knobs; :meth:`options` spells it as command-line options."""

    tensor: int
    stages: int
    bundles: int
    stages_per_rank: int
    schedule: str
    microbatches: int
    zero: int
    recompute: str
    map_by: str = ""  # ranks onto hosts (mpirun's --map-by, hvdtrain launch's); "": one host, or as launched
    widths: tuple[int, ...] = ()  # ranks per stage group (--bundle-shape); (): one each

    def knobs(self) -> dict[str, Any]:
        """The config knobs that set this layout (``Config.resolved(**knobs)``; ``map_by`` is the
        launcher's)."""
        shape = ",".join(map(str, self.widths)) if self.widths else None
        return {"tensor": self.tensor, "stages": None if shape else self.stages, "bundle_shape": shape,
                "schedule": self.schedule, "microbatches": self.microbatches, "zero": self.zero,
                "recompute": self.recompute, "stages_per_rank": self.stages_per_rank, "placement": "auto"}

    def options(self) -> list[str]:
        """:meth:`knobs` as command-line options (the defaults, one stage per rank and placement auto,
        left out)."""
        out = []
        for k, v in self.knobs().items():
            if v is not None and k != "placement" and (k, v) != ("stages_per_rank", 1):
                out += [f"--{k.replace('_', '-')}", str(v)]
        return out

    def describe(self) -> str:
        spr = f" ({self.stages_per_rank} per rank)" if self.stages_per_rank > 1 else ""
        if self.widths:
            spr += f" of widths {'+'.join(map(str, self.widths))}"
        return (f"tensor {self.tensor} x {self.stages} stage(s){spr} x {self.bundles} bundle(s), "
                f"{self.schedule}, {self.microbatches} microbatch(es), zero {self.zero}, "
                f"recompute {self.recompute}" + (f", --map-by {self.map_by}" if self.map_by else ""))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def shapes(k: int) -> Iterator[tuple[int, ...]]:
    """Every way to cut a bundle of ``k`` ranks into 2 or more stage groups, some of several ranks."""
    def cut(n: int) -> Iterator[tuple[int, ...]]:
        if n == 0:
            yield ()
            return
        for first in range(1, n + 1):
            for rest in cut(n - first):
                yield (first, *rest)
    for w in cut(k):
        if len(w) > 1 and max(w) > 1:
            yield w


def choices(world: int, rows: int, layers: int, tensor_ok: bool, attention: bool, max_microbatches: int = 8,
            max_tensor: int = 0) -> Iterator[Choice]:
    """Every choice for ``world`` ranks and ``rows`` rows per pass of a model of ``layers`` layers (at
    most that many model stages); ``tensor_ok``: it splits its tensors (at most ``max_tensor`` ranks, 0:
    any); ``attention``: ``--recompute selective`` applies. Stage groups of several ranks too (each row
    of a microbatch on one of them; one model stage per group)."""
    modes = ("none", "full", "selective") if attention else ("none", "full")
    for t in divisors(world) if tensor_ok else [1]:
        if max_tensor and t > max_tensor:
            continue
        for s in divisors(world // t):
            b = world // (t * s)
            for spr in (1, 2) if s > 1 else (1,):
                if s * spr > layers:
                    continue
                for sched in (FLAT if spr == 1 else VIRTUAL) if s > 1 else ("1f1b",):
                    for m, z, rc in _knobs(rows, b, (1,), max_microbatches, modes):
                        yield Choice(t, s, b, spr, sched, m, z, rc)
        for b in divisors(world // t):  # stage groups of several ranks (rows split among them)
            for w in shapes(world // (t * b)):
                if len(w) > layers:
                    continue
                for sched in FLAT:
                    for m, z, rc in _knobs(rows, b, w, max_microbatches, modes):
                        yield Choice(t, len(w), b, 1, sched, m, z, rc, widths=w)


def _knobs(rows: int, bundles: int, widths: tuple[int, ...], max_microbatches: int,
           modes: tuple[str, ...]) -> Iterator[tuple[int, int, str]]:
    """(microbatches, --zero, --recompute) for ``bundles`` whose microbatches split evenly over each
    stage group's ``widths`` ranks."""
    for m in divisors(rows // bundles) if rows % bundles == 0 else []:
        if m > max_microbatches or any((rows // (bundles * m)) % x for x in widths):
            continue
        for z in (0, 1, 2) if bundles > 1 else (0,):
            for rc in modes:
                yield m, z, rc
