"""Evaluation and prediction over every held-out row, at any layout (forward-only runs of the executor).

A forward-only step needs a batch that splits evenly over bundles x
microbatches x stage widths (a *unit*). Held-out sets rarely are a multiple
of it, so:

- :func:`evaluate` runs whole batches over the largest multiple of the unit,
  then the last ``r`` rows padded to one unit with copies of the last row,
  and one more unit made only of that row. The metric is a sum over rows
  (as the runtime's transparency already requires: a row's output does not
  depend on its batch mates), so the padding's share is exactly
  ``(unit - r) / unit`` of that last unit, and is taken out. Every row
  counts once, whatever the layout.
- :func:`predict` pads the same way and drops the padding rows again.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from ..layout.rows import BatchError, replica_rows
from ..parallel import randomness
from .data import Dataset
from .engine import Engine

__all__ = ["MetricFn", "evaluate", "language_model_metrics", "predict", "unit_rows"]

# (sink output, targets) -> (sum of the metric over rows, number of rows)
MetricFn = Callable[[Any, Any], tuple[float, int]]


def unit_rows(engine: Engine) -> int:
    """The smallest batch every layout split accepts: bundles x microbatches x lcm(widths)."""
    layout = engine.groups.layout
    return layout.num_bundles * engine.cfg.pipeline.microbatches * math.lcm(*layout.widths)


def _forward(engine: Engine, data: Dataset, idx: list[int]) -> list[Any]:
    """Forward-only run of one batch; the (output, targets) of this rank's sink microbatches.

    Every tensor rank of the sink gets its outputs (a metric of vocabulary-split logits
    runs collectives over them); only tensor rank 0's values are counted.
    """
    mbs = engine.cfg.pipeline.microbatches
    with torch.no_grad():
        res = engine.executor.run(engine.eval_plan, engine.batch_fn(data, idx, mbs), mbs, train=False,
                                  rows_fn=engine.rows_fn(idx, mbs))
    return res.outputs if engine.graph.sink in engine.modules else []


def _metric(engine: Engine, data: Dataset, idx: list[int], metric_fn: MetricFn) -> tuple[float, float]:
    total, count = 0.0, 0.0
    for out, y in _forward(engine, data, idx):
        with torch.no_grad():
            s, n = metric_fn(out, y)
        total, count = total + s, count + n
    return (total, count) if engine.is_sink else (0.0, 0.0)


def evaluate(engine: Engine, data: Dataset, metric_fn: MetricFn, batch_size: int) -> tuple[float, int]:
    """Collective: the mean of ``metric_fn`` over every row of ``data``, and the rows counted.

    Args:
        metric_fn: ``(sink output, targets) -> (sum over rows, rows)``.
        batch_size: rows per forward-only batch (rounded to a multiple of the unit).

    Returns:
        (metric sum / rows, rows) — the same at every layout.
    """
    unit = unit_rows(engine)
    n = len(data)
    whole = n // unit * unit
    bs = max(unit, batch_size // unit * unit)
    engine.train_mode(False)
    randomness.set_step(engine.cfg.run.seed, 0)  # evaluation draws (e.g. masks) never change
    total, count, last_total, last_count = 0.0, 0.0, 0.0, 0.0
    for start in range(0, whole, bs):
        s, c = _metric(engine, data, list(range(start, min(start + bs, whole))), metric_fn)
        total, count = total + s, count + c
    r = n - whole
    if r:
        s, c = _metric(engine, data, list(range(whole, n)) + [n - 1] * (unit - r), metric_fn)
        total, count = total + s, count + c
        last_total, last_count = _metric(engine, data, [n - 1] * unit, metric_fn)
    t, c, lt, lc = engine.world_sum([total, count, last_total, last_count],
                                    "the evaluation allreduce of every rank")
    pad = (unit - r) / unit if r else 0.0
    t, c = t - pad * lt, round(c - pad * lc)
    return (t / c if c else float("nan")), int(c)


def predict(engine: Engine, data: Dataset, batch_size: int,
            rows: Callable[[Any], torch.Tensor] = lambda out: out) -> Optional[torch.Tensor]:
    """Collective: the sink's output for every row of ``data``, in order, on world rank 0.

    ``rows(sink output)`` turns one microbatch's output into a tensor with one
    row per data row. The last batch is padded (with copies of the last row)
    to a whole unit and the padding is dropped again. Other ranks get None.
    """
    layout, c, mbs = engine.groups.layout, engine.groups.coord, engine.cfg.pipeline.microbatches
    unit = unit_rows(engine)
    n = len(data)
    if n == 0:
        raise BatchError("predict: the data set is empty")
    indices = list(range(n)) + [n - 1] * (-n % unit)
    bs = max(unit, batch_size // unit * unit)
    width = layout.widths[c.stage]
    engine.train_mode(False)
    randomness.set_step(engine.cfg.run.seed, 0)
    mine: list[tuple[int, torch.Tensor]] = []
    for start in range(0, len(indices), bs):
        idx = indices[start:start + bs]
        for mb, (out, _targets) in enumerate(_forward(engine, data, idx)):
            lo, hi = replica_rows(len(idx), layout.num_bundles, c.bundle, mbs, mb, width, c.replica)
            got = rows(out).detach().cpu()
            if got.shape[0] != hi - lo:
                raise ValueError(f"predict: rows() gave {got.shape[0]} rows for {hi - lo} data rows")
            if engine.is_sink:  # tensor rank 0 of the sink
                mine.append((start + lo, got))
    parts = engine.groups.world.gather(mine, root=0)
    if parts is None:
        return None
    pieces = sorted((p for part in parts for p in part), key=lambda p: p[0])
    at = 0
    for start, t in pieces:  # the sink replicas' rows must tile the data exactly once
        assert start == at, f"predict: rows from {start}, expected {at}"
        at += t.shape[0]
    assert at == len(indices), (at, len(indices))
    return torch.cat([t for _, t in pieces])[:n]


def language_model_metrics(loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None, batch: int = 64,
                           unit: str = "byte", **extra: float) -> Callable[[Any, Any], dict[str, float]]:
    """``(trainer, data set) -> metrics`` of a language model: the mean next-``unit`` loss
    (``loss_fn`` is a mean over a microbatch's positions; default: the trained model's loss),
    bits per ``unit``, rows, and ``extra`` (e.g. a baseline's loss), evaluated ``batch`` rows at a time."""

    def run(trainer: Any, d: Any) -> dict[str, float]:
        fn = loss_fn if loss_fn is not None else trainer.model.loss_fn

        def nll(out: Any, y: Any) -> tuple[float, int]:
            return float(fn(out, y)) * y.shape[0], int(y.shape[0])

        loss, rows = trainer.evaluate(d, nll, batch)
        return {"loss": loss, f"bits_per_{unit}": loss / math.log(2), "rows": rows, **extra}
    return run
