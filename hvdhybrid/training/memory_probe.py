"""The facts :mod:`memory_plan` predicts from, measured in one process without communication.

Each stage is built as its rank would build it (a model that splits its
tensors gets a stand-in communicator of the run's tensor size, whose
collectives leave values as they are: sizes and saved bytes do not depend on
them). Its parameters are counted, and one training forward of one microbatch
(the rows a replica of that stage computes) runs under the executor's
saved-tensor hooks and recomputation mode, with the loss at the sink, to count
the bytes kept for the backward. The optimizer's state per element comes from
one step of it on a stand-in parameter.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..parallel import randomness, recompute
from ..parallel.recompute import Recompute
from ..pipeline.saved import SavedBytes
from .memory_plan import OptimizerFacts, StageFacts

__all__ = ["StandInComm", "measure_stage", "optimizer_facts", "run_stage", "stage_inputs"]


class StandInComm:
    """A tensor communicator of ``size`` ranks seen from ``rank``: collectives leave buffers as they are."""

    def __init__(self, size: int, rank: int = 0) -> None:
        self.size, self.rank = size, rank

    def Get_size(self) -> int:  # noqa: N802 (mpi4py's names)
        return self.size

    def Get_rank(self) -> int:  # noqa: N802
        return self.rank

    def Allreduce(self, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        return None

    def Allgather(self, send: Any, recv: Any) -> None:  # noqa: N802
        recv.reshape(-1)[:send.size] = send.reshape(-1)

    def Barrier(self) -> None:  # noqa: N802
        return None


def optimizer_facts(optimizer_fn: Callable[[list[torch.nn.Parameter]], Any]) -> OptimizerFacts:
    """State bytes per parameter element and per tensor, from one step on stand-in parameters of 8 and
    16 elements (what grows with the elements, and what each tensor keeps however large)."""
    sizes = []
    for n in (8, 16):
        p = torch.nn.Parameter(torch.zeros(n))
        opt = optimizer_fn([p])
        p.grad = torch.ones(n)
        opt.step()
        sizes.append(sum(v.numel() * v.element_size() for v in opt.state[p].values() if torch.is_tensor(v)))
    per_element = (sizes[1] - sizes[0]) // 8
    return OptimizerFacts(per_element, sizes[0] - 8 * per_element)


def _outputs(model: Any, modules: dict[int, torch.nn.Module], stage: int, x: Any,
             memo: dict[int, tuple[Any, ...]]) -> tuple[Any, ...]:
    """What ``stage`` sends on, for inputs ``x`` (no graph kept)."""
    if stage not in memo:
        g = model.graph
        args = ([x] if stage in g.batch_stages else []) + [
            _one(_outputs(model, modules, up, x, memo)) for up in g.upstream(stage)]
        with torch.no_grad():
            out = modules[stage](*args)
        memo[stage] = out if isinstance(out, tuple) else (out,)
    return memo[stage]


def _one(out: tuple[Any, ...]) -> Any:
    return out[0] if len(out) == 1 else out


def _leaf(t: Any) -> Any:
    if isinstance(t, tuple):
        return tuple(_leaf(u) for u in t)
    if torch.is_tensor(t) and t.is_floating_point():
        return t.detach().requires_grad_(True)
    return t


def stage_inputs(model: Any, modules: dict[int, torch.nn.Module], stage: int, x: Any, seed: int,
                 rows: int) -> tuple[torch.nn.Module, list[Any]]:
    """``stage``'s module (every stage built as needed, all in training mode) and its inputs for data
    ``x`` of ``rows`` rows: the data where it takes the batch, each upstream stage's output as a leaf
    that takes a gradient. Keyed randomness is set to step 1 of ``seed`` and those rows (the caller
    sets the rows back to None when done)."""
    g = model.graph
    for s in range(g.num_stages):
        if s not in modules:
            modules[s] = model.build(s)
        modules[s].train(True)
    randomness.set_step(seed, 1)
    randomness.set_rows(list(range(rows)))
    memo: dict[int, tuple[Any, ...]] = {}
    args = ([x] if stage in g.batch_stages else []) + [
        _leaf(_one(_outputs(model, modules, up, x, memo))) for up in g.upstream(stage)]
    return modules[stage], args


def run_stage(module: torch.nn.Module, args: list[Any], mode: str) -> Any:
    """A training forward of ``module`` under recompute ``mode``, as the executor runs it."""
    with recompute.selective(mode == "selective"):
        return recompute.full(module, *args) if mode == "full" else module(*args)


def measure_stage(model: Any, modules: dict[int, torch.nn.Module], stage: int, batch: tuple[Any, Any],
                  mode: str, seed: int = 0, rows: Optional[int] = None) -> StageFacts:
    """``stage``'s facts: its parameters, and the bytes its training forward of ``batch`` (one
    microbatch of the rows one of its replicas computes) keeps for the backward under ``mode``
    (``none``, ``full``, ``selective``). ``modules`` holds the stages built so far (upstream ones are
    built as needed for the input). ``rows``: how many rows ``batch`` holds (default: the length of
    its input, or of its first input)."""
    x, y = batch
    if rows is None:
        rows = len(x) if not isinstance(x, (tuple, list)) else len(x[0])
    module, args = stage_inputs(model, modules, stage, x, seed, rows)
    counter = SavedBytes()
    counter.exclude(p for m in modules.values() for p in m.parameters())
    with counter.hooks():
        out = run_stage(module, args, mode)
    loss: Optional[torch.Tensor] = None
    if stage == model.graph.sink:
        with counter.hooks():
            loss = model.loss_fn(out, y)
    params = {id(p): p for p in module.parameters()}
    facts = StageFacts(sum(p.numel() for p in params.values()), len(params), counter.peak)
    del out, loss, args
    randomness.set_rows(None)
    return facts


def check_mode(text: str, stages: int, attention: bool) -> Recompute:
    """The run's recomputation modes, checked as the engine checks them."""
    rc = Recompute.parse(text)
    rc.check(stages, attention, "this model", False)
    return rc
