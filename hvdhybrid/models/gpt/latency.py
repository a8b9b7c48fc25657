"""The latency model of a GPT stage on this machine: timed, or counted in FLOPs at a timed rate.

*Measured* (:func:`measure`): one stage of the config (its share of the
blocks) is built and timed on slices of several lengths ``l`` after several
contexts ``c``, forward and backward with the keys and values of the context
held as a :class:`~hvdhybrid.pipeline.kvcache.SliceCache` (as the executor runs it);
the transfer of a slice's activations and gradients is timed as MPI
point-to-point messages of their size. :func:`hvdhybrid.pipeline.token_slices.fit`
turns the samples into ``t(b, l, c) = c0 + b (c1 l + c2 l (c + l))``.

*Counted* (:func:`counted`), for shapes too large to time here (``gpt3-175b``):
the FLOPs of the stage's blocks, forward and backward (3x the forward), at the
rates this machine reaches on matrix products of the config's shapes (timed on
a few rows): ``c1`` from the dense matrices (``24 h^2`` FLOPs per token and
block, forward), ``c2`` from attention (``4 h`` per token and earlier token),
and ``c0`` the fixed cost of running a block, timed on a one-token slice of
the ``tiny`` config's block.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ...pipeline.kvcache import SliceCache
from ...pipeline.token_slices import LatencyModel, fit
from .model import CONFIGS, GPTConfig, GPTStage

__all__ = ["measure", "counted", "transfer_samples", "stage_layers", "MEASURABLE_PARAMS"]

MEASURABLE_PARAMS = 400_000_000  # a stage larger than this is counted, not timed


def stage_layers(cfg: GPTConfig, stages: int) -> int:
    """Blocks on the busiest stage when the blocks are cut evenly."""
    return -(-cfg.layers // stages)


def _median_time(fn: Callable[[Any], None], repeats: int, setup: Callable[[], Any] = lambda: None) -> float:
    """Median seconds of ``fn(setup())`` over ``repeats`` runs after one warm-up; ``setup`` is not timed."""
    out = []
    for r in range(repeats + 1):
        arg = setup()
        t0 = time.perf_counter()
        fn(arg)
        if r:
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _lengths(seq_len: int, points: int) -> list[int]:
    """Slice lengths to time: ``seq_len / 2^k`` down to ``seq_len / 2^(points+1)`` (at least 1)."""
    return sorted({max(1, seq_len >> k) for k in range(points + 2)})


def _contexts(seq_len: int, length: int, points: int) -> list[int]:
    """Contexts before a slice of ``length``: 0 and evenly up to ``seq_len - length``."""
    room = seq_len - length
    if room == 0 or points == 0:
        return [0]
    return sorted({room * i // points for i in range(points + 1)})


def _time_slice(stage: GPTStage, xs: torch.Tensor, c: int, repeats: int) -> float:
    """Median seconds of forward+backward of ``xs[:, c:]`` after the context ``xs[:, :c]``, whose keys
    and values are cached as the executor leaves them (the context itself is not timed)."""

    def context() -> Optional[SliceCache]:
        if not c:
            return None
        cache = SliceCache((c, xs.shape[1] - c))
        stage(xs[:, :c], cache=cache)
        cache.begin(1)
        return cache

    def run(cache: Optional[SliceCache]) -> None:
        y = stage(xs[:, c:].requires_grad_(), cache=cache)
        y.backward(torch.ones_like(y))

    return _median_time(run, repeats, context)


def stage_samples(cfg: GPTConfig, layers: int, rows: int, seq_len: int, points: int = 4,
                  repeats: int = 3) -> list[tuple[int, int, int, float]]:
    """``(b, l, c, seconds)``: forward+backward of ``layers`` blocks on ``rows`` sequences of a
    slice of ``l`` tokens after ``c`` cached ones; ``l`` halves from ``seq_len``, ``c`` runs from 0
    to ``seq_len - l``."""
    from mpi4py import MPI

    stage = GPTStage(cfg, [f"h.{i}" for i in range(layers)], MPI.COMM_SELF, 0)
    stage.train()
    return [(rows, ln, c, _time_slice(stage, torch.randn(rows, c + ln, cfg.hidden), c, repeats))
            for ln in _lengths(seq_len, points) for c in _contexts(seq_len, ln, points)]


def _time_send(a: torch.Tensor, repeats: int) -> float:
    """Median seconds of two messages of ``a`` (activations, then gradients) to this process."""
    from mpi4py import MPI

    comm, b = MPI.COMM_SELF, torch.empty_like(a)

    def run(_: Any) -> None:
        for _i in range(2):
            req = comm.Irecv(b.numpy(), source=0, tag=7)
            comm.Send(a.numpy(), dest=0, tag=7)
            req.Wait()

    return _median_time(run, repeats)


def transfer_samples(hidden: int, rows: int, seq_len: int, points: int = 4,
                     repeats: int = 5) -> list[tuple[int, int, float]]:
    """``(b, l, seconds)``: an MPI message of a slice's activations one way and its gradient back
    (``b x l x hidden`` fp32 each), timed as messages to this process (a shared-memory copy)."""
    return [(rows, ln, _time_send(torch.randn(rows * ln * hidden), repeats))
            for ln in _lengths(seq_len, points)]


def measure(cfg: GPTConfig, stages: int, rows: int, seq_len: int, points: int = 4,
            repeats: int = 3) -> tuple[LatencyModel, list[tuple[int, int, int, float]]]:
    """Time one stage of ``cfg`` cut into ``stages`` on this machine; fit the latency model.

    Returns:
        The model and the stage samples it was fitted to.
    """
    samples = stage_samples(cfg, stage_layers(cfg, stages), rows, seq_len, points, repeats)
    return fit(samples, transfer_samples(cfg.hidden, rows, seq_len, points)), samples


def _matmul_rate(m: int, k: int, n: int, repeats: int = 3) -> float:
    """FLOP/s of an ``[m, k] @ [k, n]`` product on this machine."""
    a, b = torch.randn(m, k), torch.randn(k, n)

    def run(_: Any) -> None:
        torch.matmul(a, b)

    return 2.0 * m * k * n / _median_time(run, repeats)


def counted(cfg: GPTConfig, stages: int, rows: int = 1, probe_rows: int = 64,
            link: Optional[Sequence[tuple[int, int, float]]] = None) -> tuple[LatencyModel, dict[str, Any]]:
    """The latency model from FLOP counts at the matrix-product rates this machine reaches.

    Returns:
        The model and what it rests on (rates in GFLOP/s, the stage's blocks).
    """
    h, n = cfg.hidden, stage_layers(cfg, stages)
    fixed = min(t for _, _, _, t in stage_samples(CONFIGS["tiny"], 1, 1, 4, 1, 5))
    dense = _matmul_rate(probe_rows, h, min(4 * h, 8192))
    attn = _matmul_rate(probe_rows, cfg.head_dim, 1024)
    c1 = n * 3 * 24 * h * h / dense  # forward + backward = 3x forward
    c2 = n * 3 * 4 * h / attn
    sends = list(link) if link is not None else transfer_samples(min(h, 1024), 1, 256, 3)
    scale = h / min(h, 1024)  # messages timed at a narrower hidden size, scaled by their bytes
    d1, d0 = np.polyfit([b * ln * scale for b, ln, _ in sends], [t for _, _, t in sends], 1)
    model = LatencyModel(c0=n * fixed, c1=c1, c2=c2, d0=max(float(d0), 0.0), d1=max(float(d1), 0.0))
    return model, {"dense_gflops": dense / 1e9, "attention_gflops": attn / 1e9, "blocks": n,
                   "block_overhead_s": fixed}
