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


# -- the schedule bench's two models: the MLP above and GPT-2 small ----------------------------------

GPT2_SEQ, GPT2_MICRO = 64, 8  # 8 microbatches of one 64-token sequence each
MODELS = ("mlp", "gpt2")


def model_arg(argv: list[str]) -> tuple[str, list[str]]:
    """``--model mlp|gpt2`` (first, default mlp) and the rest of ``argv``."""
    if argv[:1] == ["--model"]:
        if len(argv) < 2 or argv[1] not in MODELS:
            raise SystemExit(f"--model: choose one of {', '.join(MODELS)}")
        return argv[1], argv[2:]
    return "mlp", argv


def model_rows(model: str) -> int:
    """Rows (sequences for GPT-2) of one global batch."""
    return BATCH if model == "mlp" else GPT2_MICRO


def model_parts(model: str, n: int) -> list[nn.Module]:
    """The model cut into ``n`` consecutive stages, the same cut for every runner (no tied weights
    across stages: GPT-2's head keeps its own copy of the embedding, so no peer pays for a tie)."""
    if model == "mlp":
        layers = mlp_layers()
        per = len(layers) // n
        return [nn.Sequential(*layers[i * per:(i + 1) * per]) for i in range(n)]
    from mpi4py import MPI

    from hvdhybrid.models.gpt2.model import GPT2Stage, hf_config, hf_model, unit_names

    config = hf_config("gpt2-small", dropout=0.0)
    units = unit_names(config.n_layer)
    cuts = [round(len(units) * i / n) for i in range(n + 1)]
    full = hf_model(config, 0)
    parts = [GPT2Stage(full, units[cuts[i]:cuts[i + 1]], MPI.COMM_SELF) for i in range(n)]
    head: Any = parts[-1].get_submodule("lm_head")
    head.weight = nn.Parameter(head.weight.detach().clone())  # untied from the embedding's
    return parts


def model_batch(model: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One global batch: (inputs, targets)."""
    if model == "mlp":
        return batch()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (GPT2_MICRO, GPT2_SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def model_loss(model: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if model == "mlp":
        return nn.functional.mse_loss
    return lambda logits, y: nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
