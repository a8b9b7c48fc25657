"""Tensor-parallel building blocks over the tensor communicator (the ranks that split a stage's tensors).

Megatron's scheme: a *column-parallel* linear layer holds a slice of the output
features (its input is copied to every tensor rank: the backward sums the input
gradient), a *row-parallel* one a slice of the input features (its partial
outputs are summed in the forward). An attention layer split by heads is a
column-parallel QKV projection and a row-parallel output projection. The
vocabulary-parallel embedding holds a slice of the vocabulary's rows; the
vocabulary-parallel cross entropy takes each rank's slice of the logits and
never builds the whole row.

Collectives are mpi4py buffer calls on CPU buffers (a GPU tensor is staged
through the host); float16/bfloat16 are summed in float32. Every tensor rank
runs the same actions on the same rows, so the collectives line up.
:data:`COMM_SECONDS` adds up the time spent in them (benchmarks read it).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
from torch import nn

from .ownership import Sharded, tag

__all__ = ["COMM_SECONDS", "allreduce", "copy_to", "gather_last", "reduce_from", "shard_parameter",
           "vocab_parallel_embedding", "vocab_parallel_cross_entropy"]

COMM_SECONDS = [0.0]  # time spent in tensor-parallel collectives, for the benchmark's share


def allreduce(t: torch.Tensor, comm: Any, op: str = "sum") -> torch.Tensor:
    """``t`` summed (or maxed) over ``comm``, out of place, on ``t``'s device and dtype."""
    from mpi4py import MPI

    if comm.Get_size() == 1:
        return t
    t0 = time.perf_counter()
    host = t.detach().to("cpu", torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype)
    buf = host.contiguous().clone()
    comm.Allreduce(MPI.IN_PLACE, buf.numpy(), op=MPI.SUM if op == "sum" else MPI.MAX)
    COMM_SECONDS[0] += time.perf_counter() - t0
    return buf.to(t.device, t.dtype)


class _CopyTo(torch.autograd.Function):
    """Forward: identity; backward: sum the gradient over the tensor ranks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        return allreduce(g, ctx.comm), None


class _ReduceFrom(torch.autograd.Function):
    """Forward: sum over the tensor ranks; backward: identity."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Any) -> torch.Tensor:  # type: ignore[override]
        return allreduce(x, comm)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        return g, None


def copy_to(x: torch.Tensor, comm: Any) -> torch.Tensor:
    """The input of a column-parallel layer (every rank uses all of it)."""
    return x if comm.Get_size() == 1 else _CopyTo.apply(x, comm)  # type: ignore[no-any-return]


def reduce_from(x: torch.Tensor, comm: Any) -> torch.Tensor:
    """The output of a row-parallel layer: the ranks' partial sums added."""
    return x if comm.Get_size() == 1 else _ReduceFrom.apply(x, comm)  # type: ignore[no-any-return]


def gather_last(x: torch.Tensor, comm: Any) -> torch.Tensor:
    """Every tensor rank's ``x`` side by side along the last dimension (no gradient): whole logits."""
    if comm.Get_size() == 1:
        return x
    t0 = time.perf_counter()
    host = x.detach().to("cpu", torch.float32).contiguous()
    parts = torch.empty((comm.Get_size(),) + tuple(host.shape), dtype=torch.float32)
    comm.Allgather(host.numpy(), parts.numpy())
    COMM_SECONDS[0] += time.perf_counter() - t0
    return torch.cat(list(parts), -1)


def shard_parameter(full: torch.Tensor, comm: Any, dim: int, parts: int = 1, pad: int = 0) -> nn.Parameter:
    """This tensor rank's slice of ``full`` (padded with ``pad`` zero rows of ``dim`` first) as a new
    Parameter, tagged :class:`Sharded`."""
    from .ownership import cut

    size, rank = comm.Get_size(), comm.Get_rank()
    shard = Sharded(dim, size, rank, parts, pad)
    p = nn.Parameter(cut(full.detach(), shard).clone())
    tag(p, shard)
    return p


def vocab_parallel_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int, comm: Any) -> torch.Tensor:
    """Rows ``ids`` of the embedding whose rows ``start .. start + len(weight)`` this rank holds."""
    local = ids - start
    inside = (local >= 0) & (local < weight.shape[0])
    out = nn.functional.embedding(local.clamp(0, weight.shape[0] - 1), weight)
    out = out * inside.unsqueeze(-1).to(out.dtype)
    return reduce_from(out, comm)


class _VocabCE(torch.autograd.Function):
    """Per-row cross entropy from this rank's vocabulary columns of the logits."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, start: int,  # type: ignore[override]
                comm: Any) -> torch.Tensor:
        x = logits.float()
        m = allreduce(x.max(-1).values, comm, "max")
        z = x - m.unsqueeze(-1)
        e = z.exp()
        total = allreduce(e.sum(-1), comm)
        local = target - start
        inside = (local >= 0) & (local < x.shape[-1])
        idx = local.clamp(0, x.shape[-1] - 1)
        picked = z.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * inside.to(z.dtype)
        picked = allreduce(picked, comm)
        ctx.save_for_backward(e / total.unsqueeze(-1), idx, inside)
        ctx.dtype = logits.dtype
        return total.log() - picked

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        softmax, idx, inside = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, idx.unsqueeze(-1), -inside.to(grad.dtype).unsqueeze(-1))
        return (grad * g.unsqueeze(-1)).to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, start: int, comm: Any,
                                 reduction: Optional[str] = "mean") -> torch.Tensor:
    """Cross entropy of logits split by vocabulary columns (this rank: ``start ..``); no rank builds
    the whole row. ``reduction``: ``mean`` over every position, or None for per-position losses."""
    if comm.Get_size() == 1:
        flat = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                           reduction="none")
        per = flat.view(target.shape)
    else:
        per = _VocabCE.apply(logits, target, start, comm)
    return per.mean() if reduction == "mean" else per


