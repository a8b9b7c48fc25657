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
import resource
import sys
from typing import Any

import torch

__all__ = ["memory_report", "peak_rss", "return_freed_memory", "tensor_bytes"]


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once, whole)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def return_freed_memory() -> bool:
    """Give the memory the allocator holds free back to the kernel.

    Called after the model is built (before ``--zero``'s flat buffer is made)
    and once more after the trainer is, so the build's temporaries (whole
    initial weights, the parameters copied into ``--zero``'s flat buffer) do not
    stay resident for the whole run, nor under the flat buffer's peak. Under
    jemalloc (:mod:`hvdhybrid.allocator`,
    hvdtrain's default where installed, run with freed pages kept for reuse) it
    purges every arena; under glibc it is ``malloc_trim``: glibc serves blocks below
    its mapping threshold (raised up to 32 MB as large blocks are freed) from
    heaps it seldom shrinks. Not per step: measured on GPT-2 mini under glibc,
    trimming every step saved 8% of the peak RSS and cost 15% (``none``) to 30%
    (``full`` recomputation) of the step time, as the next step faults the pages
    back in; a low fixed mapping threshold saved 18% and cost 70%. Returns whether
    it ran (Linux only).
    """
    if not sys.platform.startswith("linux"):
        return False
    from ..allocator import running

    if running() == "jemalloc":
        try:
            mallctl = ctypes.CDLL(None).mallctl
        except AttributeError:
            return False
        # 4096 is MALLCTL_ARENAS_ALL: every arena
        return bool(mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0)) == 0)
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


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
