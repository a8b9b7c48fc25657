"""Shared pieces of the benchmarks: the model, timing, JSON output."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

WIDTH, DEPTH, BATCH, MICRO = 1024, 8, 256, 8


def mlp_layers(seed: int = 0) -> list[nn.Module]:
    """The balanced 8-layer, 1024-wide MLP (every layer Linear + ReLU)."""
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU()) for _ in range(DEPTH)]


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)


def time_steps(step: Callable[[], Any], warmup: int, steps: int, sync: Callable[[], Any] = lambda: None
               ) -> list[float]:
    for _ in range(warmup):
        step()
    sync()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def emit(obj: dict[str, Any]) -> None:
    """One JSON line on stdout, prefixed so the driver can find it among log lines."""
    print("BENCH " + json.dumps(obj), flush=True)
    sys.stdout.flush()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def one_thread() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
