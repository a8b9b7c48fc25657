"""TeraPipe slice planning: where to cut each sequence along the token axis.

Over 350 lines for one concept: the latency model, its fit, the dynamic
program and the brute force that proves it share the same cost function.

A causal transformer's sequence of ``L`` tokens is cut into slices
``l_1 + ... + l_n = L``. Slice ``i`` attends to the context ``c_i = l_1 + ... + l_{i-1}``
and costs ``t_i = t(l_i, c_i)`` on every stage, more the later it comes. With ``K``
stages, stage ``k`` runs slice ``i`` while stage ``k + 1`` runs slice ``i - 1``, so a
step of ``M`` microbatches of ``b`` sequences takes (TeraPipe, Li et al., ICML 2021)

    T = M * sum_i t_i(b) + (K - 1) * max_j t_j(b).

:class:`LatencyModel` predicts ``t(b, l, c) = c0 + b * (c1 * l + c2 * l * (c + l) + c3 * c)`` for
one stage plus ``d0 + d1 * b * l`` to send the slice's activations and gradients. The
``l * (c + l)`` term is the masked attention score block of the slice, so cutting lowers it
(``sum l_i (c_i + l_i) = (L^2 + sum l_i^2) / 2``): even one stage may gain from slicing
when ``c2`` outweighs the per-slice overhead ``c0 + d0``.

Planning (TeraPipe's dynamic program): under a cap ``t_max`` the cheapest slicing whose
slices all cost at most ``t_max`` is a shortest path, ``f[0] = 0``,
``f[j] = min_{i < j, t(j - i, i) <= t_max} f[i] + t(j - i, i)``, and
``T <= M * f[L] + (K - 1) * t_max``, with equality when ``t_max`` is the optimum's own
largest slice cost; so one of the distinct slice costs, used as the cap, yields the
optimum. The caps are walked downwards: the plan found under a cap, with largest slice
cost ``t``, is also the answer for every cap in ``[t, cap]``, so the next cap worth trying
is the largest slice cost below ``t``. As ``f[L]`` only grows when the cap falls, the walk
stops once ``M * f[L]`` alone exceeds the best ``T`` found. One DP layer per slice count
honours ``max_slices`` and, among equal times, keeps the fewest slices.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from ..errors import InputError

__all__ = ["LatencyModel", "PlanError", "SlicePlan", "best_uniform", "brute_force", "fit", "lengths_text",
           "parse_slices", "plan_joint", "plan_slices", "residuals", "step_time", "uniform"]

_TIE = 1e-12  # relative difference under which two step times are equal
_FIELDS = ("c0", "c1", "c2", "d0", "d1", "c3")


class PlanError(InputError):
    """A slicing, latency model or measurement that cannot be used."""


@dataclass(frozen=True)
class LatencyModel:
    """Seconds of forward+backward for one stage on one slice of ``b`` sequences."""

    c0: float = 0.0
    c1: float = 0.0
    c2: float = 0.0
    d0: float = 0.0
    d1: float = 0.0
    c3: float = 0.0  # per sequence and context token: reading (joining) the cached keys and values

    def __post_init__(self) -> None:
        for name in _FIELDS:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0):
                raise PlanError(f"latency coefficient {name}={v!r} is invalid; give a finite number >= 0")

    def stage_time(self, b: int, length: int, context: int) -> float:
        """Compute time of one stage on ``b`` sequences' slices of ``length`` tokens after ``context``."""
        return self.c0 + b * (self.c1 * length + self.c2 * length * (context + length) + self.c3 * context)

    def transfer(self, b: int, length: int) -> float:
        """Point-to-point time of the slice's activations and gradients."""
        return self.d0 + self.d1 * b * length

    def slice_time(self, b: int, length: int, context: int) -> float:
        """The per-stage slice cost ``t_i`` the planner uses: compute plus transfer."""
        return self.stage_time(b, length, context) + self.transfer(b, length)

    def to_dict(self) -> dict[str, float]:
        """JSON-able coefficients."""
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyModel:
        """Rebuild a model saved by :meth:`to_dict`."""
        missing, extra = set(_FIELDS) - set(data) - {"c3"}, set(data) - set(_FIELDS)
        if missing or extra:
            raise PlanError(f"latency model has keys {sorted(data)}; expected exactly {list(_FIELDS)}")
        try:
            values = {k: float(data[k]) for k in _FIELDS if k in data}
        except (TypeError, ValueError):
            raise PlanError(f"latency model {dict(data)} has a non-numeric coefficient; "
                            "give numbers (seconds)") from None
        return cls(**values)


@dataclass(frozen=True)
class SlicePlan:
    """A slicing of every sequence, its batch split and its predicted step time."""

    lengths: tuple[int, ...]
    microbatches: int
    rows: int
    predicted: float
    t_max: float

    def describe(self) -> str:
        """One line, e.g. ``4 slices 96,64,48,48 x 2 microbatches of 4 sequences: 1.234 s``."""
        n, m, b = len(self.lengths), self.microbatches, self.rows
        return (f"{n} slice{'s' * (n != 1)} {lengths_text(self.lengths)} x {m} "
                f"microbatch{'es' * (m != 1)} of {b} sequence{'s' * (b != 1)}: {self.predicted:.4g} s")


def lengths_text(lengths: Sequence[int]) -> str:
    """``96,64,48,48`` for a few slices; runs of equal lengths as ``32*64`` (64 slices of 32) past 12."""
    if len(lengths) <= 12:
        return ",".join(map(str, lengths))
    runs = [(v, len(list(g))) for v, g in itertools.groupby(lengths)]
    return ",".join(f"{v}*{k}" if k > 1 else str(v) for v, k in runs)


def _nnls(a: np.ndarray, y: np.ndarray) -> list[float]:
    """Least squares with x >= 0: drop the most negative coefficient and refit until none is."""
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    a = a / scale
    if np.linalg.matrix_rank(a) < a.shape[1]:
        raise PlanError(f"{len(y)} samples do not pin all {a.shape[1]} coefficients; "
                        "measure more different slice lengths, contexts and batch sizes")
    x, active = np.zeros(a.shape[1]), list(range(a.shape[1]))
    while active:
        sol = np.linalg.lstsq(a[:, active], y, rcond=None)[0]
        if (sol >= 0).all():
            x[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return [float(v) for v in x / scale]


def _samples(data: Sequence[Sequence[float]], width: int, what: str) -> np.ndarray:
    if len(data) < width - 1:
        raise PlanError(f"need at least {width - 1} {what} samples to fit the latency model, got "
                        f"{len(data)}; measure more slice lengths and contexts")
    rows = np.asarray(data, dtype=float)
    if rows.ndim != 2 or rows.shape[1] != width:
        raise PlanError(f"{what} samples must each hold {width} numbers; fix the measurements file")
    return rows


def fit(samples: Sequence[Sequence[float]], transfers: Sequence[Sequence[float]] = ()) -> LatencyModel:
    """Fit a model to stage times ``(b, l, c, seconds)`` and transfer times ``(b, l, seconds)``.

    Raises:
        PlanError: too few samples, or samples too alike to pin every coefficient.
    """
    s = _samples(samples, 4, "(b, l, c, seconds) stage-time")
    bl, c, l_ = s[:, 0] * s[:, 1], s[:, 2], s[:, 1]
    # relative least squares (each row divided by its time): timings span orders of magnitude, and
    # in absolute seconds the longest slices would drown the per-slice overhead the planner trades off
    w = 1.0 / np.maximum(s[:, 3], 1e-12)[:, None]
    a = np.column_stack([np.ones(len(s)), bl, bl * (c + l_), s[:, 0] * c])
    c0, c1, c2, c3 = _nnls(a * w, s[:, 3] * w[:, 0])
    d0 = d1 = 0.0
    if len(transfers):
        t = _samples(transfers, 3, "(b, l, seconds) transfer")
        wt = 1.0 / np.maximum(t[:, 2], 1e-12)[:, None]
        d0, d1 = _nnls(np.column_stack([np.ones(len(t)), t[:, 0] * t[:, 1]]) * wt, t[:, 2] * wt[:, 0])
    return LatencyModel(*(max(0.0, v) for v in (c0, c1, c2, d0, d1, c3)))


def residuals(model: LatencyModel, samples: Iterable[Sequence[float]]) -> list[float]:
    """Relative error ``predicted / measured - 1`` of the stage time for each ``(b, l, c, seconds)``."""
    out = []
    for b, length, c, sec in samples:
        if sec <= 0:
            raise PlanError(f"measured time {sec} s is not positive; drop the sample or re-measure it")
        out.append(model.stage_time(int(b), int(length), int(c)) / sec - 1.0)
    return out


def _check(**sizes: int) -> None:
    for name, v in sizes.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise PlanError(f"{name} must be a positive integer, got {v!r}; pass a whole number >= 1")


def _times(model: LatencyModel, lengths: Sequence[int], rows: int) -> list[float]:
    return [model.slice_time(rows, n, c) for n, c in zip(lengths, itertools.accumulate([0, *lengths]))]


def step_time(model: LatencyModel, lengths: Sequence[int], stages: int,
              microbatches: int = 1, rows: int = 1) -> float:
    """``T = M * sum_i t_i + (K - 1) * max_j t_j`` for the slicing ``lengths``."""
    _check(stages=stages, microbatches=microbatches, rows=rows)
    if not lengths or min(lengths) < 1:
        raise PlanError(f"slice lengths {list(lengths)} must be one or more positive integers")
    times = _times(model, lengths, rows)
    return microbatches * sum(times) + (stages - 1) * max(times)


def _plan(model: LatencyModel, lengths: Sequence[int], stages: int, microbatches: int,
          rows: int) -> SlicePlan:
    return SlicePlan(tuple(int(v) for v in lengths), microbatches, rows,
                     step_time(model, lengths, stages, microbatches, rows), max(_times(model, lengths, rows)))


def _better(a: SlicePlan, b: Optional[SlicePlan]) -> bool:
    """Faster, or as fast (to ``_TIE``) with fewer slices."""
    if b is None or a.predicted < b.predicted * (1 - _TIE):
        return True
    return a.predicted <= b.predicted * (1 + _TIE) and len(a.lengths) < len(b.lengths)


def _best(plans: Iterable[SlicePlan]) -> SlicePlan:
    """The first fastest plan, fewest slices among ties."""
    best: Optional[SlicePlan] = None
    for plan in plans:
        best = plan if _better(plan, best) else best
    assert best is not None
    return best


def _costs(model: LatencyModel, units: int, gran: int, rows: int) -> np.ndarray:
    """``S[i, j]``: cost of the slice from grid position ``i`` to ``j`` (inf unless ``i < j``)."""
    c = np.arange(units + 1, dtype=float)[:, None] * gran
    n = np.arange(units + 1, dtype=float)[None, :] * gran - c
    s = (model.c0 + rows * (model.c1 * n + model.c2 * n * (c + n) + model.c3 * c)
         + (model.d0 + model.d1 * rows * n))
    return np.where(n > 0, s, np.inf)


def _shortest(s: np.ndarray, cap: float, max_slices: int) -> Optional[tuple[float, list[int]]]:
    """Cheapest cover of ``0..G`` by at most ``max_slices`` slices costing <= ``cap``: (sum, cuts)."""
    units, cols = len(s) - 1, np.arange(len(s))
    w = np.where(s <= cap, s, np.inf)
    f = np.full(units + 1, np.inf)
    f[0] = 0.0
    best, best_n, parents = np.inf, 0, []
    for n in range(1, min(max_slices, units) + 1):
        par = (f[:, None] + w).argmin(axis=0)
        f = f[par] + w[par, cols]
        parents.append(par)
        if f[units] < best * (1 - _TIE):
            best, best_n = float(f[units]), n
    if best_n == 0:
        return None
    cuts = [units]
    for n in range(best_n, 0, -1):
        cuts.append(int(parents[n - 1][cuts[-1]]))
    return best, cuts[::-1]


def _lengths(cuts: Sequence[int], granularity: int) -> list[int]:
    return [(j - i) * granularity for i, j in zip(cuts, cuts[1:])]


def _units(seq_len: int, granularity: int) -> int:
    if seq_len % granularity:
        fit_g = max(d for d in range(1, granularity + 1) if seq_len % d == 0)
        raise PlanError(f"sequence length {seq_len} is not a multiple of granularity {granularity}; "
                        f"use a granularity that divides it, e.g. {fit_g}")
    return seq_len // granularity


def plan_slices(model: LatencyModel, seq_len: int, stages: int, rows: int = 1, microbatches: int = 1,
                granularity: int = 1, max_slices: Optional[int] = None) -> SlicePlan:
    """The slicing (lengths multiples of ``granularity``) with the least predicted step time.

    Walks the caps downwards (see the module docstring); one stage needs only the uncapped DP.

    Raises:
        PlanError: a size below 1, or ``seq_len`` not a multiple of ``granularity``.
    """
    _check(seq_len=seq_len, stages=stages, rows=rows, microbatches=microbatches, granularity=granularity)
    if max_slices is not None:
        _check(max_slices=max_slices)
    units = _units(seq_len, granularity)
    s = _costs(model, units, granularity, rows)
    caps = np.unique(s[np.isfinite(s)])
    best: Optional[SlicePlan] = None
    cap = float(caps[-1])
    while (found := _shortest(s, cap, units if max_slices is None else min(max_slices, units))):
        cost, cuts = found
        if best is not None and microbatches * cost > best.predicted * (1 + _TIE):
            break  # lower caps only cost more
        plan = _plan(model, _lengths(cuts, granularity), stages, microbatches, rows)
        best = plan if _better(plan, best) else best
        below = int(np.searchsorted(caps, max(s[i, j] for i, j in zip(cuts, cuts[1:])))) - 1
        if stages == 1 or below < 0:
            break
        cap = float(caps[below])
    assert best is not None  # one slice always fits under the largest cap
    return best


def plan_joint(model: LatencyModel, seq_len: int, stages: int, batch: int, granularity: int = 1,
               max_slices: Optional[int] = None) -> SlicePlan:
    """Best slicing and batch split: ``b`` sequences per microbatch for each ``b`` dividing ``batch``."""
    _check(batch=batch)
    return _best(plan_slices(model, seq_len, stages, b, batch // b, granularity, max_slices)
                 for b in range(1, batch + 1) if batch % b == 0)


def uniform(seq_len: int, n: int) -> tuple[int, ...]:
    """``n`` slices as equal as possible; the first ``seq_len % n`` are one token longer."""
    _check(seq_len=seq_len)
    if n < 1:
        raise PlanError(f"--slices {n}: need at least 1 slice; give N >= 1 or 'auto'")
    if n > seq_len:
        raise PlanError(f"--slices {n} is more than the sequence length {seq_len}; use at most {seq_len}")
    q, r = divmod(seq_len, n)
    return tuple(q + 1 if i < r else q for i in range(n))


def best_uniform(model: LatencyModel, seq_len: int, stages: int, rows: int = 1, microbatches: int = 1,
                 candidates: Optional[Iterable[int]] = None) -> list[SlicePlan]:
    """Uniform slicings (default 1, 2, 4, ... <= ``seq_len`` slices), fastest first."""
    if candidates is None:
        candidates = (1 << k for k in range(seq_len.bit_length()))
    plans = [_plan(model, uniform(seq_len, n), stages, microbatches, rows) for n in dict.fromkeys(candidates)]
    return sorted(plans, key=lambda p: (p.predicted, len(p.lengths)))


def brute_force(model: LatencyModel, seq_len: int, stages: int, rows: int = 1, microbatches: int = 1,
                granularity: int = 1) -> SlicePlan:
    """The best of all ``2^(G-1)`` slicings of ``G = seq_len / granularity`` units (tests only)."""
    _check(seq_len=seq_len, granularity=granularity)
    units = _units(seq_len, granularity)
    if units > 20:
        raise PlanError(f"brute_force would try 2^{units - 1} slicings; use plan_slices beyond 20 units")
    every = ([0, *(i for i, cut in enumerate(bits, 1) if cut), units]
             for bits in itertools.product((False, True), repeat=units - 1))
    return _best(_plan(model, _lengths(cuts, granularity), stages, microbatches, rows) for cuts in every)


def parse_slices(text: str, seq_len: int) -> Optional[tuple[int, ...]]:
    """``--slices``: ``auto`` -> None (plan it), ``N`` -> N equal slices, ``64,64,48`` -> those lengths."""
    t = text.strip()
    if t.lower() == "auto":
        return None
    parts = [p.strip() for p in t.split(",")]
    if not all(p.lstrip("+-").isdigit() for p in parts):
        raise PlanError(f"--slices {text}: expected 'auto', a number of slices N, or lengths like 64,64,48")
    if len(parts) == 1:
        return uniform(seq_len, int(parts[0]))
    lengths = tuple(int(p) for p in parts)
    if min(lengths) < 1:
        raise PlanError(f"--slices {text}: every slice length must be a positive integer; drop or fix "
                        "the zero and negative ones")
    if sum(lengths) != seq_len:
        raise PlanError(f"--slices {text} sums to {sum(lengths)} but the sequence length is {seq_len}; "
                        f"give lengths that sum to {seq_len} (or --slices N for N equal slices)")
    return lengths
