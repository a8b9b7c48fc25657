"""The C allocator a rank runs with: jemalloc where it is installed, the C library's otherwise.

glibc serves blocks below its mapping threshold (which it raises up to 32 MB as
large blocks are freed) from heaps it seldom shrinks, so a training process
keeps freed gradients, recomputed activations and the build's temporaries
resident. jemalloc's size classes pack them again. Measured here (GPT-2, AdamW,
peak RSS from the kernel): gpt2-medium in one process 6951 -> 6253 MB (1.05x of
what the memory accounting counts plus the libraries at rest, from 1.17x);
GPT-2 mini, one process and 2 ranks, 17-20% less. With jemalloc's default decay
(freed pages returned after 10 s) steps took 5-7% longer, as the next step
faults the pages back in; with decay off (:data:`CONF`: freed pages stay for
reuse, the peak is what it was) step times matched glibc's within the noise.

``hvdtrain`` (``python -m hvdhybrid``) starts again under jemalloc before it
imports anything large: :func:`reexec`. ``HVDHYBRID_ALLOCATOR=system`` keeps the
C library's allocator; ``MALLOC_CONF`` set by the user is kept. The Python API
runs in the caller's process and changes nothing: preload it there
(``LD_PRELOAD=$(python -c 'import hvdhybrid.allocator as a; print(a.library())')``).
``bin/setup`` installs Debian's ``libjemalloc2``.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

__all__ = ["CHOICES", "CONF", "ENV", "AllocatorError", "library", "reexec", "running"]

ENV = "HVDHYBRID_ALLOCATOR"
CHOICES = ("jemalloc", "system")
#: jemalloc options: keep freed pages for reuse instead of returning them on a timer
CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
_MARK = "_HVDHYBRID_ALLOCATOR_SET"
_PLACES = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
           "/usr/local/lib")


class AllocatorError(ValueError):
    """An ``HVDHYBRID_ALLOCATOR`` value that is not one of :data:`CHOICES`."""


def library() -> Optional[str]:
    """The path of ``libjemalloc.so.2`` (``HVDHYBRID_JEMALLOC`` first), or None when it is not installed."""
    given = os.environ.get("HVDHYBRID_JEMALLOC")
    if given:
        return given if os.path.exists(given) else None
    for d in _PLACES:
        path = os.path.join(d, "libjemalloc.so.2")
        if os.path.exists(path):
            return path
    return None


def choice(env: Optional[dict[str, str]] = None) -> str:
    """``HVDHYBRID_ALLOCATOR``: ``jemalloc`` (the default) or ``system``.

    Raises:
        AllocatorError: on another value.
    """
    value = (env if env is not None else os.environ).get(ENV, "jemalloc").strip().lower() or "jemalloc"
    if value not in CHOICES:
        raise AllocatorError(f"{ENV}={value!r}: choose {' or '.join(CHOICES)} (jemalloc: less resident "
                             "memory; system: the C library's allocator)")
    return value


def running() -> str:
    """The allocator this process runs with: ``jemalloc`` when it is preloaded, else ``system``."""
    return "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system"


def preload_env(env: dict[str, str], lib: str) -> dict[str, str]:
    """``env`` with ``lib`` first in ``LD_PRELOAD`` and :data:`CONF` unless ``MALLOC_CONF`` is set."""
    out = dict(env)
    out["LD_PRELOAD"] = ":".join(x for x in (lib, env.get("LD_PRELOAD", "")) if x)
    out.setdefault("MALLOC_CONF", CONF)
    out[_MARK] = "1"
    return out


def reexec() -> None:
    """Start this process again with jemalloc preloaded, unless it already is, the user chose
    ``system``, this is the restarted process, or jemalloc is not installed. Call before importing
    torch (nothing is lost: the process has done nothing yet). Exits 2 on a bad ``HVDHYBRID_ALLOCATOR``."""
    if not sys.platform.startswith("linux") or os.environ.get(_MARK) or running() == "jemalloc":
        return
    try:
        if choice() == "system":
            return
    except AllocatorError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    lib = library()
    if lib is None:
        return
    argv = list(getattr(sys, "orig_argv", []))
    if not argv:
        return
    os.execve(sys.executable, [sys.executable, *argv[1:]], preload_env(dict(os.environ), lib))
