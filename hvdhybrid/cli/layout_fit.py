"""``hvdtrain plan -np SLOTS --fit MODEL [its options]``: the largest world of at most SLOTS ranks that the
command's own layout rule fits (its ``--stages``, ``--tensor``, ``--bundle-shape`` kept; bundles as many as
fit), checked as a run checks it (layout, batch arithmetic, placement). What ``hvdtrain launch --elastic``
asks before each (re)launch.

When no world of the rule fits (a bundle needs more ranks than are left), the smallest change to the rule
that fits: fewest layout options changed (the tensor size, to a divisor of it; the stage count, lower;
one of them before both), then the most ranks, then the largest bundle. The answer's ``changes`` maps each
option to its new value (``None``: dropped), for the command line; ``--keep-layout`` refuses instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional

from ..config import Config, ParallelConfig, check_batch
from ..errors import USER_ERRORS
from ..layout.topology import LayoutError
from ..parallel.recompute import Recompute
from .plan_memory import run_as_planner

__all__ = ["apply_changes", "describe_changes", "fit_layout", "largest_fit"]

Changes = dict[str, Optional[str]]  # command-line option -> its new value (None: dropped)


def largest_fit(name: str, cfg: Config, slots: int, default_widths: tuple[int, ...],
                widths: Optional[tuple[int, ...]], tensor_parallel: bool,
                strict: bool = False) -> dict[str, Any]:
    """The largest world of at most ``slots`` ranks for model command ``name`` (what
    :func:`session.run_model` got): ``{"np", "bundles", "bundle_size", "widths", "tensor", "layout",
    "changes"}`` (``changes`` empty when the command's own rule fits; see the module).

    Raises:
        LayoutError: nothing fits (with ``strict``: the rule does not), with the reason the smallest
            world of the rule gave.
    """
    p = cfg.parallel
    if p.tensor > 1 and not tensor_parallel:
        raise LayoutError(f"hvdtrain {name} cannot split its tensors (--tensor {p.tensor})")
    try:
        return {**_largest(name, cfg, slots, default_widths, widths), "changes": {}}
    except LayoutError as e:
        if strict or not _fits_somewhere(cfg, slots, default_widths, widths):
            raise  # (without strict) it fits no world: the rule is wrong, not too large for the ranks here
        refused = str(e)
    for edits in (1, 2):
        fits = []
        for changes, parallel in _changes(p, default_widths, widths is not None, edits):
            try:
                got = _largest(name, dataclasses.replace(cfg, parallel=parallel), slots, default_widths,
                               widths)
            except LayoutError:
                continue
            fits.append({**got, "changes": changes})
        if fits:
            return max(fits, key=lambda g: (g["np"], g["bundle_size"]))
    raise LayoutError(f"{refused}; no smaller --tensor or --stages fits either")


def _fits_somewhere(cfg: Config, slots: int, default_widths: tuple[int, ...],
                    widths: Optional[tuple[int, ...]], most: int = 1024) -> bool:
    """Whether the rule fits some world of ``slots`` to ``most`` ranks (then it did not fit ``slots``
    for want of ranks; else it fits none and a change of layout would hide the mistake)."""
    for n in range(slots + 1, most + 1):
        try:
            _check(cfg, n, default_widths, widths)
        except USER_ERRORS:
            continue
        return True
    return False


def _check(cfg: Config, n: int, default_widths: tuple[int, ...], widths: Optional[tuple[int, ...]]) -> Any:
    """The layout of ``n`` ranks, checked as a run checks it (raises a user error where it does not fit)."""
    p = cfg.parallel
    layout = p.layout(n, default_widths, widths)
    check_batch(cfg, layout)
    p.placement_for(layout, cfg.pipeline.schedule)
    Recompute.parse(cfg.pipeline.recompute).check(p.model_stages(layout), True, "the model")
    return layout


def _largest(name: str, cfg: Config, slots: int, default_widths: tuple[int, ...],
             widths: Optional[tuple[int, ...]]) -> dict[str, Any]:
    first: Optional[str] = None
    for n in range(slots, 0, -1):
        try:
            layout = _check(cfg, n, default_widths, widths)
        except USER_ERRORS as e:
            first = first or str(e)
            continue
        return {"np": n, "bundles": layout.num_bundles, "bundle_size": layout.bundle_size,
                "widths": list(layout.widths), "tensor": layout.tensor, "layout": layout.describe()}
    raise LayoutError(f"no layout of hvdtrain {name} with these options fits in {slots} rank(s): {first}")


def _changes(p: ParallelConfig, default_widths: tuple[int, ...], fixed_widths: bool,
             edits: int) -> Iterator[tuple[Changes, ParallelConfig]]:
    """Every rule with ``edits`` of the tensor size (a divisor of it, lower) and the stage count (lower, or
    the same with stages one rank wide instead of ``--bundle-shape``; not where the model turns --stages
    into widths itself) changed."""
    widths = p.widths(default_widths)
    stages = len(widths) + (1 if p.bundle_shape is not None and max(widths) > 1 else 0)  # 2,1 -> 1,1 too
    tensors = [t for t in range(p.tensor - 1, 0, -1) if p.tensor % t == 0]
    fewer = [] if fixed_widths else list(range(stages - 1, 0, -1))
    if edits == 1:
        for t in tensors:
            yield {"--tensor": str(t)}, dataclasses.replace(p, tensor=t)
        for s in fewer:
            yield _stages(p, s), dataclasses.replace(p, stages=s, bundle_shape=None)
    else:
        for t in tensors:
            for s in fewer:
                yield ({"--tensor": str(t), **_stages(p, s)},
                       dataclasses.replace(p, tensor=t, stages=s, bundle_shape=None))


def _stages(p: ParallelConfig, s: int) -> Changes:
    return {"--stages": str(s), **({"--bundle-shape": None} if p.bundle_shape is not None else {})}


def apply_changes(args: list[str], changes: Changes) -> list[str]:
    """``args`` (a model command line) with each option in ``changes`` set to its new value (given once, at
    the end) or dropped (``None``); ``--opt X`` and ``--opt=X`` alike."""
    out: list[str] = []
    skip = False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a in changes and i + 1 < len(args):
            skip = True
            continue
        if a.split("=", 1)[0] in changes and "=" in a:
            continue
        out.append(a)
    for opt, value in changes.items():
        if value is not None:
            out += [opt, value]
    return out


def describe_changes(changes: Changes) -> str:
    """``--tensor 1, --stages 1, --bundle-shape dropped``."""
    return ", ".join(f"{k} {v}" if v is not None else f"{k} dropped" for k, v in changes.items())


def fit_layout(command: list[str], slots: int, cli: Any, strict: bool = False) -> dict[str, Any]:
    """:func:`largest_fit` for model command ``command`` (as after ``hvdtrain``) of group ``cli``. From
    Python: :func:`hvdhybrid.cli.main.fit_layout`."""
    got: dict[str, Any] = {}

    def planner(name: str, cfg: Config, default_widths: tuple[int, ...], widths: Any, build: Any,
                tensor_parallel: bool) -> None:
        got.update(largest_fit(name, cfg, slots, default_widths, widths, tensor_parallel, strict))

    run_as_planner(command, cli, planner)
    return got
