"""Per-rank memory predicted for a layout: what :mod:`memory` will count when the run trains.

Pure arithmetic over a few measured facts of the model (no communication):

- :class:`StageFacts`: per stage (on one tensor rank), its parameter elements and
  parameter tensors, and the bytes its forward saves for the backward per
  microbatch under the run's recomputation mode;
- :class:`OptimizerFacts`: the optimizer's state per parameter element (AdamW: 2
  tensors shaped like it) and per parameter tensor (AdamW's ``step``);
- the rank's plan (its schedule's actions), which says how many microbatches
  each stage holds in flight.

The figures are the ones :func:`hvdhybrid.training.memory.memory_report`
measures: parameters (a tie held on one rank once; ``--zero``: the flat buffer,
padded to a multiple of the data group), gradients at their largest after the
synchronisation (``--zero 2``: the share), optimizer state, and the peak of
saved activations (walking the plan: a forward adds its stage's bytes, the
backward that consumes them, or its weight pass when the plan splits one off,
releases them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["OptimizerFacts", "StageFacts", "activations_peak", "position_figures", "predict_rank",
           "tie_sizes"]


@dataclass(frozen=True)
class StageFacts:
    """One stage on one tensor rank."""

    params: int  # parameter elements
    tensors: int  # parameter tensors
    activations: int  # bytes saved for the backward per microbatch (under the recompute mode)


@dataclass(frozen=True)
class OptimizerFacts:
    """State the optimizer keeps: bytes per parameter element, and bytes per parameter tensor."""

    per_element: int
    per_tensor: int


def activations_peak(plan: Sequence[object], saved: dict[int, int]) -> int:
    """The peak of live saved bytes walking ``plan`` (actions with ``stage``, ``kind``, ``mb``,
    ``slice``): a forward adds ``saved[stage]``; its weight pass (W) releases them where the plan has
    one for that microbatch (a batched W those of each it covers), else its backward (B)."""
    has_w = {(a.stage, m, a.slice) for a in plan if a.kind == "W" for m in a.mbs}  # type: ignore[attr-defined]
    live = peak = 0
    for a in plan:
        key = (a.stage, a.mb, a.slice)  # type: ignore[attr-defined]
        kind = a.kind  # type: ignore[attr-defined]
        if kind == "F":
            live += saved[key[0]]
            peak = max(peak, live)
        elif kind == "W":
            live -= saved[key[0]] * a.n  # type: ignore[attr-defined]
        elif kind == "B" and key not in has_w:
            live -= saved[key[0]]
    return peak


def predict_rank(stages: Sequence[StageFacts], shared: int, opt: OptimizerFacts, zero: int,
                 data_size: int, plan: Sequence[object], saved: dict[int, int],
                 shared_tensors: int = 0) -> dict[str, int]:
    """One rank's predicted bytes.

    Args:
        stages: the facts of the stages this rank runs.
        shared: parameter elements counted more than once in ``stages`` that are one tensor on this
            rank (a tie whose stages are all here), and ``shared_tensors`` the tensors so counted.
        opt: the optimizer's state per element and per tensor.
        zero: the ``--zero`` level (0, 1, 2).
        data_size: members of the rank's data group (bundles); ``--zero`` with 1 shards nothing.
        plan: this rank's schedule actions; ``saved``: stage -> saved bytes per microbatch.
    """
    elements = sum(s.params for s in stages) - shared
    tensors = sum(s.tensors for s in stages) - shared_tensors
    if zero and data_size > 1:
        n = -(-elements // data_size)  # the share; the flat buffer is n * d
        params = grads_whole = 4 * n * data_size
        grads = 4 * n if zero == 2 else grads_whole
        optimizer = opt.per_element * n + opt.per_tensor
    else:
        params = grads = 4 * elements
        optimizer = opt.per_element * elements + opt.per_tensor * tensors
    return {"parameters": params, "gradients": grads, "optimizer": optimizer,
            "activations_peak": activations_peak(plan, saved)}


def tie_sizes(model: Any, modules: dict[int, Any]) -> list[tuple[tuple[int, ...], int]]:
    """Each tie of ``model``: its stages, and its parameter's elements (read from the built modules)."""
    return [(tuple(t.stages), int(model.stage_parameters(min(t.stages), modules[min(t.stages)])
                                  [t.names[min(t.stages)]].numel())) for t in model.ties]


def position_figures(layout: Any, placement: Any, plans: Any, facts: dict[int, Any],
                     ties: list[tuple[tuple[int, ...], int]], opt: Any, zero: int) -> list[dict[str, Any]]:
    """Per stage group position: its ranks, its model stages and :func:`predict_rank`'s figures."""
    saved = {s: f.activations for s, f in facts.items()}
    rows = []
    for pos in range(layout.num_stages):
        stages = placement.stages_on(pos)
        # a tie whose stages are all on this rank is one tensor there (counted once per extra stage)
        local = [(ts, size) for ts, size in ties if all(s in stages for s in ts)]
        fig = predict_rank([facts[s] for s in stages], sum(size * (len(ts) - 1) for ts, size in local), opt,
                           zero, layout.num_bundles, plans[pos], saved, sum(len(ts) - 1 for ts, _ in local))
        ranks = [r for r in range(layout.world_size) if layout.coord(r).stage == pos]
        rows.append({"ranks": ranks, "stages": list(stages), **fig})
    return rows
