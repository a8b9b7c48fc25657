"""What one rank holds, in bytes: parameters, gradients, optimizer state, saved activations, peak RSS.

Counted from the tensors themselves: parameters once each (a tie on one rank
is one object), gradients at their largest after a step's synchronisation,
every tensor of the optimizer's state, the peak of activations kept for the
backward (:class:`hvdhybrid.pipeline.saved.SavedBytes`), and the process's
peak resident set size from the kernel (``ru_maxrss``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
from typing import Any

import torch

__all__ = ["MMAP_THRESHOLD", "memory_report", "peak_rss", "return_freed_memory", "tensor_bytes"]


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once, whole)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


#: allocations from this size up are mapped on their own and go back to the kernel when freed
MMAP_THRESHOLD = 128 << 10


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc map every allocation of ``threshold`` bytes or more on its own (``mallopt``).

    glibc's default raises its mapping threshold each time a large block is freed, up
    to 32 MB, and serves later blocks from its heap, which it seldom gives back: a
    run's gradients, wire buffers and checkpoint copies then stay resident after they
    are freed (on GPT-2 small, 18% of the peak RSS per rank). A fixed threshold turns
    that off. Left alone when ``MALLOC_MMAP_THRESHOLD_`` is set (the user's choice) or
    the C library is not glibc. Returns whether it was set.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, int(threshold)))


def peak_rss() -> int:
    """This process's peak resident set size, in bytes."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb if sys.platform == "darwin" else kb * 1024)


def memory_report(engine: Any, grads: int) -> dict[str, int]:
    """This rank's figures (``grads``: the largest gradient bytes seen after a synchronisation)."""
    params = [p for m in engine.modules.values() for p in m.parameters()]
    opt = getattr(engine.optimizer, "inner", engine.optimizer)  # --zero: the share's optimizer
    state = [v for st in opt.state.values() for v in st.values()]
    return {"parameters": tensor_bytes(params), "gradients": grads, "optimizer": tensor_bytes(state),
            "activations_peak": engine.executor.saved.peak, "rss_peak": peak_rss()}
