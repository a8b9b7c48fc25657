"""Measured costs for the planner, in this one process: each stage's forward and backward time at the
rows a layout gives it, the bytes it sends on, and what its tensor collectives carry.

Each stage is built as its rank would build it (a model that splits its tensors
gets a stand-in communicator of the layout's tensor size, which counts the
bytes each collective would carry and leaves the values as they are: times do
not depend on them), runs a training forward and backward of one microbatch
of its rows under the layout's recomputation mode with the threads a rank will
have, a warm-up then the median of ``reps``; each backward adds into the gradients the one before left,
as every microbatch of a step but its first does. The backward is timed whole and, as the zero-bubble
schedules run it, split (``B``, the input gradients, then ``W``, the weights'): ``W`` is not half of
the backward everywhere (under ``--recompute full`` each of its backwards recomputes the layers it
reaches). Collective and point-to-point times come from :mod:`.links`, not from here.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..parallel import randomness
from ..training.memory_probe import StandInComm, run_stage, stage_inputs

__all__ = ["CountingComm", "StageTime", "optimizer_time", "time_stage"]


class CountingComm(StandInComm):
    """:class:`StandInComm` that counts the all-reduces and their bytes (one rank's side)."""

    def __init__(self, size: int, rank: int = 0) -> None:
        super().__init__(size, rank)
        self.calls = 0
        self.bytes = 0

    def Allreduce(self, send: Any, recv: Any = None, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        buf = recv if hasattr(recv, "nbytes") else send  # (MPI.IN_PLACE, buffer) or (buffer, ...)
        if hasattr(buf, "nbytes"):
            self.calls += 1
            self.bytes += int(buf.nbytes)
        return None


@dataclass(frozen=True)
class StageTime:
    """One stage, one microbatch of its rows, on one rank (seconds and bytes)."""

    forward: float
    backward: float
    out_bytes: int  # what it sends downstream per microbatch (0 at the sink)
    tensor_calls: int = 0  # all-reduces over the tensor group per microbatch (forward and backward)
    tensor_bytes: int = 0
    split_b: Optional[float] = None  # the backward run split: B (input gradients), then
    split_w: Optional[float] = None  # W (the weights'); None: not measured (taken as half each)

    def b(self, split: bool) -> float:
        """``B``'s seconds, whole or with ``W`` split off."""
        if not split:
            return self.backward
        return self.split_b if self.split_b is not None else self.backward / 2

    def w(self) -> float:
        """``W``'s seconds for one microbatch."""
        return self.split_w if self.split_w is not None else self.backward / 2


def _bytes(out: Any) -> int:
    if torch.is_tensor(out):
        return int(out.numel() * out.element_size())
    if isinstance(out, (tuple, list)):
        return sum(_bytes(o) for o in out)
    return 0


def _grad_target(out: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [(o, torch.ones_like(o)) for o in outs if torch.is_tensor(o) and o.requires_grad]


def time_stage(model: Any, modules: dict[int, torch.nn.Module], stage: int, batch: tuple[Any, Any],
               mode: str, rows: int, comm: Optional[CountingComm] = None, reps: int = 3,
               seed: int = 0, fetch: Optional[Any] = None) -> StageTime:
    """``stage``'s :class:`StageTime` for ``batch`` (``rows`` rows) under recompute ``mode``, its backward
    timed whole and split into ``B`` and ``W``; ``comm``: the stand-in tensor communicator the stage was
    built with (its counts are read and reset); ``fetch``: takes a microbatch's rows from the data set
    (timed with the forward of the stages that take the batch)."""
    from ..pipeline.saved import SavedBytes

    g = model.graph
    x, y = batch
    module, args = stage_inputs(model, modules, stage, x, seed, rows)
    counted = SavedBytes()  # the run counts every saved tensor, a Python call each: so does the probe
    counted.exclude(p for m in modules.values() for p in m.parameters())

    def forward() -> tuple[Any, Optional[torch.Tensor]]:
        """The stage's output and, at the sink, its loss, as the executor runs them."""
        with counted.hooks():
            out = run_stage(module, args, mode)
            return out, (model.loss_fn(out, y) if stage == g.sink else None)

    fwd, bwd, sent, calls, nbytes = [], [], 0, 0, 0
    for rep in range(reps + 1):
        if comm is not None:
            comm.calls = comm.bytes = 0
        t0 = time.perf_counter()
        if fetch is not None and (stage in g.batch_stages or stage == g.sink):
            fetch()  # the microbatch's rows, as the executor takes them for each
        out, loss = forward()
        sent = 0 if loss is not None else _bytes(out)
        t1 = time.perf_counter()
        roots, grads = _roots(out, loss)
        if roots:
            torch.autograd.backward(roots, grads)
        t2 = time.perf_counter()
        if rep:  # the first is a warm-up
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        if comm is not None:
            calls, nbytes = comm.calls, comm.bytes
        del out, loss  # the gradients stay: each backward adds into them, as a step's microbatches do
    bs, ws = _split(module, args, forward, reps)
    module.zero_grad(set_to_none=True)
    randomness.set_rows(None)
    return StageTime(statistics.median(fwd), statistics.median(bwd), sent, calls, nbytes,
                     statistics.median(bs) if bs else None, statistics.median(ws) if ws else None)


def _roots(out: Any, loss: Optional[torch.Tensor]) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
    """Where a stage's backward starts, and with what gradient: its loss, or each output (ones)."""
    if loss is not None:
        return [loss], [None]
    pairs = _grad_target(out)
    return [o for o, _ in pairs], [gr for _, gr in pairs]


def _split(module: torch.nn.Module, args: list[Any], forward: Callable[[], tuple[Any, Any]],
           reps: int) -> tuple[list[float], list[float]]:
    """The backward as a zero-bubble schedule runs it: ``B`` then ``W`` (:mod:`..pipeline.split_backward`),
    each timed, after a warm-up."""
    from ..pipeline.split_backward import backward_input, backward_weight

    params = [p for p in module.parameters() if p.requires_grad]
    leaves = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    bs, ws = [], []
    for rep in range(reps + 1):
        out, loss = forward()
        roots, grads = _roots(out, loss)
        if not roots:
            return [], []
        t0 = time.perf_counter()
        job = backward_input(roots, grads, leaves, params)
        t1 = time.perf_counter()
        backward_weight([job], params)
        t2 = time.perf_counter()
        if rep:
            bs.append(t1 - t0)
            ws.append(t2 - t1)
        del out, loss, job
    return bs, ws


def optimizer_time(optimizer_fn: Any, elements: int = 1 << 23, reps: int = 3) -> float:
    """Seconds per parameter element of a step's tail: the gradient's squared norm (the guard, float64
    a chunk at a time, as :mod:`hvdhybrid.training.gradsync` does) and one optimizer step, on
    ``elements`` of them (8 M: 32 MB per tensor, past the caches, as a model's parameters are)."""
    from ..training.gradsync import _square_sum

    p = torch.nn.Parameter(torch.zeros(elements))
    opt = optimizer_fn([p])
    p.grad = torch.full((elements,), 1e-3)
    opt.step()
    got = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _square_sum(p.grad)
        opt.step()
        got.append(time.perf_counter() - t0)
    return statistics.median(got) / elements
