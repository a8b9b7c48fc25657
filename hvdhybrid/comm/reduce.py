"""MPI reduce of a tensor to one root, float16 summed in float16 (MPI has no float16 type or sum).

ZeRO-2 sends each chunk of gradients to the member that owns it (a chunk never
straddles two owners), so a member's share stays one contiguous range, and a
chunk can go as soon as its gradients are final. A float16 chunk travels as
16-bit integers with a sum of our own (torch's half add: each pair converted to
float32, added, rounded back, as Horovod's float16 sum does).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

__all__ = ["reduce_to"]


@functools.lru_cache(maxsize=None)
def _fp16_sum() -> Any:
    import numpy as np
    from mpi4py import MPI

    def add(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
        a = torch.from_numpy(np.frombuffer(inbuf, dtype=np.float16))
        torch.from_numpy(np.frombuffer(inoutbuf, dtype=np.float16)).add_(a)
    return MPI.Op.Create(add, commute=True)


def _raw(t: torch.Tensor) -> Any:
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def reduce_to(comm: Any, tensor: torch.Tensor, root: int) -> Optional[torch.Tensor]:
    """Collective over ``comm``: the sum of every member's ``tensor`` (float32 or float16, contiguous,
    on the CPU), returned on ``root`` (a new tensor), ``None`` elsewhere."""
    from mpi4py import MPI

    op = _fp16_sum() if tensor.dtype == torch.float16 else MPI.SUM
    out = torch.empty_like(tensor) if comm.Get_rank() == root else None
    comm.Reduce(_raw(tensor), _raw(out) if out is not None else None, op=op, root=root)
    return out
