"""``hvdtrain plan -np SLOTS --fit MODEL [its options]``: the largest world of at most SLOTS ranks that the
command's own layout rule fits (its ``--stages``, ``--tensor``, ``--bundle-shape`` kept; bundles as many as
fit), checked as a run checks it (layout, batch arithmetic, placement). What ``hvdtrain launch --elastic``
asks before each (re)launch.
"""

from __future__ import annotations

from typing import Any, Optional

from ..config import Config, check_batch
from ..errors import USER_ERRORS
from ..layout.topology import LayoutError
from .plan_memory import run_as_planner

__all__ = ["fit_layout", "largest_fit"]


def largest_fit(name: str, cfg: Config, slots: int, default_widths: tuple[int, ...],
                widths: Optional[tuple[int, ...]], tensor_parallel: bool) -> dict[str, Any]:
    """The largest world of at most ``slots`` ranks for model command ``name`` (what
    :func:`session.run_model` got): ``{"np", "bundles", "bundle_size", "widths", "tensor", "layout"}``.

    Raises:
        LayoutError: nothing fits, with the reason the smallest world gave.
    """
    p = cfg.parallel
    if p.tensor > 1 and not tensor_parallel:
        raise LayoutError(f"hvdtrain {name} cannot split its tensors (--tensor {p.tensor})")
    first: Optional[str] = None
    for n in range(slots, 0, -1):
        try:
            layout = p.layout(n, default_widths, widths)
            check_batch(cfg, layout)
            p.placement_for(layout, cfg.pipeline.schedule)
        except USER_ERRORS as e:
            first = first or str(e)
            continue
        return {"np": n, "bundles": layout.num_bundles, "bundle_size": layout.bundle_size,
                "widths": list(layout.widths), "tensor": layout.tensor, "layout": layout.describe()}
    raise LayoutError(f"no layout of hvdtrain {name} with these options fits in {slots} rank(s): {first}")


def fit_layout(command: list[str], slots: int, cli: Any) -> dict[str, Any]:
    """:func:`largest_fit` for model command ``command`` (as after ``hvdtrain``) of group ``cli``. From
    Python: :func:`hvdhybrid.cli.main.fit_layout`."""
    got: dict[str, Any] = {}

    def planner(name: str, cfg: Config, default_widths: tuple[int, ...], widths: Any, build: Any,
                tensor_parallel: bool) -> None:
        got.update(largest_fit(name, cfg, slots, default_widths, widths, tensor_parallel))

    run_as_planner(command, cli, planner)
    return got
