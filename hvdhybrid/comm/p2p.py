"""Point-to-point transport of tensors between stages, through contiguous CPU buffers.

One *message* is a tuple of tensors (or ``None`` entries). It travels as a
fixed-size int64 header (count, then dtype, requires_grad and shape per
tensor) followed by one payload per non-empty tensor, all with non-blocking
MPI calls on the bundle communicator. Because the header comes first, shapes
may change from one microbatch to the next.

- Receives are posted early (:meth:`P2P.recv` posts the header ``Irecv`` at
  once) and payload receives go straight into reusable buffers, one pool slot
  per (peer, key, tensor index).
- A contiguous CPU tensor is sent from its own memory (no copy); a device or
  strided tensor is first staged into a (pinned, where CUDA exists) CPU buffer.
- Sends are waited on late, with :meth:`P2P.wait_sends`.

The one tag rule lives in :func:`make_tag`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .. import waits

__all__ = ["MsgKey", "P2P", "P2PTimeout", "PendingRecv", "TransportError", "make_tag", "MAX_TENSORS"]

MAX_TENSORS = 16
STOP_GRACE_S = 10.0  # after a stop signal, a wait that long means the peer is not coming
MAX_DIMS = 8
_PER_TENSOR = 3 + MAX_DIMS  # dtype code, requires_grad, ndim (-1: None), dims
HEADER_LEN = 1 + MAX_TENSORS * _PER_TENSOR

_DTYPES: list[torch.dtype] = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
    torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.complex64, torch.complex128,
]
_CODE = {dt: i for i, dt in enumerate(_DTYPES)}
_NUMPY_DTYPES = frozenset(_DTYPES) - {torch.bfloat16}


class TransportError(RuntimeError):
    """A message that the receiver cannot take (too many tensors, unknown dtype, ...)."""


class P2PTimeout(TransportError):
    """A wait that passed its deadline (or was cut short by a stop signal); says who waited for what."""


@dataclass(frozen=True)
class MsgKey:
    """What a message is: the edge of the stage graph, the microbatch, the direction.

    ``direction`` is 0 for activations (forward) and 1 for gradients (backward).
    ``src_stage``/``dst_stage`` are the edge's ends in the forward direction (gradients travel from
    ``dst_stage`` to ``src_stage``), for error messages only. With token slices,
    ``slice`` is the slice of the microbatch's sequences, of ``slices``.
    """

    edge: int
    mb: int
    direction: int
    src_stage: int = -1
    dst_stage: int = -1
    slice: int = 0
    slices: int = 1

    def describe(self) -> str:
        what = "activations" if self.direction == 0 else "gradients"
        sl = f" slice {self.slice}" if self.slices > 1 else ""
        a, b = (self.src_stage, self.dst_stage) if self.direction == 0 else (self.dst_stage, self.src_stage)
        return f"{what} of microbatch {self.mb}{sl} from stage {a} to stage {b}"


def make_tag(key: MsgKey, part: int, num_edges: int) -> int:
    """The tag rule: (microbatch and token slice, edge, direction, part) -> one MPI tag.

    ``part`` 0 is the header, ``1 + i`` the payload of tensor ``i``. Messages
    with equal tags between the same two ranks (the same key in the next
    step) keep their order: MPI does not let messages overtake each other.
    """
    unit = key.mb * key.slices + key.slice
    return ((unit * num_edges + key.edge) * 2 + key.direction) * (MAX_TENSORS + 1) + part


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor's memory, sent as MPI.BYTE (bf16 as uint8)."""
    if t.dtype in _NUMPY_DTYPES:
        return t.numpy()  # the cheap path: about 1 us less per message than the uint8 view
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return flat.view(torch.uint8).numpy()


def encode_header(tensors: Sequence[Optional[torch.Tensor]]) -> np.ndarray:
    if len(tensors) > MAX_TENSORS:
        raise TransportError(f"a message holds at most {MAX_TENSORS} tensors, got {len(tensors)}")
    h = np.zeros(HEADER_LEN, dtype=np.int64)
    h[0] = len(tensors)
    for i, t in enumerate(tensors):
        o = 1 + i * _PER_TENSOR
        if t is None:
            h[o + 2] = -1
            continue
        if t.dtype not in _CODE:
            raise TransportError(f"cannot send dtype {t.dtype}; supported: {_DTYPES}")
        if t.dim() > MAX_DIMS:
            raise TransportError(f"cannot send a {t.dim()}-d tensor (at most {MAX_DIMS} dims)")
        h[o], h[o + 1], h[o + 2] = _CODE[t.dtype], int(t.requires_grad), t.dim()
        h[o + 3:o + 3 + t.dim()] = list(t.shape)
    return h


def decode_header(h: np.ndarray) -> list[Optional[tuple[torch.dtype, bool, tuple[int, ...]]]]:
    n = int(h[0])
    if not 0 <= n <= MAX_TENSORS:
        raise TransportError(f"corrupt header: {n} tensors")
    out: list[Optional[tuple[torch.dtype, bool, tuple[int, ...]]]] = []
    for i in range(n):
        o = 1 + i * _PER_TENSOR
        nd = int(h[o + 2])
        if nd < 0:
            out.append(None)
            continue
        code = int(h[o])
        if not 0 <= code < len(_DTYPES) or nd > MAX_DIMS:
            raise TransportError(f"corrupt header: dtype code {code}, {nd} dims")
        out.append((_DTYPES[code], bool(h[o + 1]), tuple(int(x) for x in h[o + 3:o + 3 + nd])))
    return out


@dataclass
class _Layout:
    """What a header decoded to for one (peer, key) slot; reused while headers repeat."""

    header: np.ndarray
    spec: list[Optional[tuple[torch.dtype, bool, tuple[int, ...]]]]
    views: list[Optional[torch.Tensor]]
    targets: list[tuple[int, Any]]  # (tag, MPI buffer spec) per non-empty tensor


@dataclass
class PendingRecv:
    """A posted receive: the header request now, payload requests once the header is in."""

    p2p: P2P
    peer: int
    key: MsgKey
    header: np.ndarray
    hreq: Any
    preqs: Optional[list[Any]] = None
    spec: Optional[list[Optional[tuple[torch.dtype, bool, tuple[int, ...]]]]] = None
    views: list[Optional[torch.Tensor]] = field(default_factory=list)

    def _post_payload(self) -> None:
        slot = (self.peer, self.key)
        cached = self.p2p._layouts.get(slot)
        if cached is None or cached.header.tobytes() != self.header.tobytes():
            # a new shape for this slot: decode, (re)size the pooled buffers, cache the views
            spec = decode_header(self.header)
            views: list[Optional[torch.Tensor]] = []
            targets: list[tuple[int, Any]] = []
            for i, s in enumerate(spec):
                view = None if s is None else self.p2p._recv_buffer(self.peer, self.key, i, s[0], s[2])
                views.append(view)
                if view is not None and view.numel():
                    targets.append((make_tag(self.key, 1 + i, self.p2p.num_edges),
                                    [_as_bytes(view), self.p2p._BYTE]))
            cached = _Layout(self.header.copy(), spec, views, targets)
            self.p2p._layouts[slot] = cached
        self.spec, self.views = cached.spec, cached.views
        self.preqs = [self.p2p.comm.Irecv(buf, source=self.peer, tag=tag)
                      for tag, buf in cached.targets]

    def _what(self) -> str:
        return f"{self.key.describe()} from {self.p2p.describe_peer(self.peer)}"

    def poll(self) -> None:
        """Post the payload receives if the header has arrived (never blocks)."""
        if self.preqs is None and self.hreq.Test():
            self._post_payload()

    def wait(self) -> tuple[Optional[torch.Tensor], ...]:
        """Block until the whole message is in; return tensors on the P2P's device."""
        if self.preqs is None:
            self.p2p.wait_all([self.hreq], self._what)
            self._post_payload()
        assert self.preqs is not None and self.spec is not None
        self.p2p.wait_all(self.preqs, self._what)
        out: list[Optional[torch.Tensor]] = []
        for view, s in zip(self.views, self.spec):
            if view is None or s is None:
                out.append(None)
                continue
            # detach: a fresh autograd leaf over the pooled buffer (no view tracking)
            t = view.to(self.p2p.device) if self.p2p.device.type != "cpu" else view.detach()
            out.append(t.requires_grad_(s[1] and t.is_floating_point()))
        return tuple(out)


class P2P:
    """Sends and receives tensor messages on one communicator (a bundle's).

    Args:
        comm: an mpi4py communicator; peers are ranks in it.
        num_edges: edges of the stage graph, for the tag rule.
        device: where received tensors should live.
    """

    def __init__(self, comm: Any, num_edges: int, device: torch.device, timeout: float = 300.0,
                 me: str = "", describe_peer: Optional[Callable[[int], str]] = None) -> None:
        from mpi4py import MPI

        self.timeout, self.me = timeout, me or f"rank {comm.Get_rank()}"
        self.describe_peer: Callable[[int], str] = describe_peer or (lambda p: f"peer {p}")
        self.stop_requested = False  # set from a signal handler: waits give up after a grace period
        self.comm = comm
        self.num_edges = max(1, num_edges)
        self.device = device
        self._BYTE = MPI.BYTE
        self._INT64 = MPI.INT64_T
        self._Request = MPI.Request
        self._pool: dict[tuple[int, MsgKey, int], torch.Tensor] = {}
        self._layouts: dict[tuple[int, MsgKey], _Layout] = {}
        self._sends: list[tuple[Any, list[Any]]] = []  # (request, objects kept alive)
        self._pin = torch.cuda.is_available()
        tag_ub = comm.Get_attr(MPI.TAG_UB)
        self.tag_ub = int(tag_ub) if tag_ub is not None else 32767

    def check_tags(self, microbatches: int, slices: int = 1) -> None:
        """Raise before any traffic if the largest tag would exceed MPI's TAG_UB."""
        top = make_tag(MsgKey(self.num_edges - 1, microbatches - 1, 1, slice=slices - 1, slices=slices),
                       MAX_TENSORS, self.num_edges)
        if top > self.tag_ub:
            per = f" x {slices} token slices" if slices > 1 else ""
            raise TransportError(
                f"{microbatches} microbatches{per} x {self.num_edges} edges need MPI tags up to {top}, "
                f"but this MPI allows {self.tag_ub}; use fewer microbatches{' or slices' if per else ''}")

    def _recv_buffer(self, peer: int, key: MsgKey, i: int, dtype: torch.dtype,
                     shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        slot = (peer, key, i)
        buf = self._pool.get(slot)
        if buf is None or buf.numel() < nbytes:
            if self._pin:
                buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
            else:
                # numpy's large allocations are backed by transparent huge pages, which
                # Open MPI's single-copy transfers read and write much faster (measured in
                # bench/p2p_throughput.py: 0.65 -> 0.95 of raw ping-pong at 64 MB)
                buf = torch.from_numpy(np.empty(max(nbytes, 1), dtype=np.uint8))
            self._pool[slot] = buf
        return buf[:nbytes].view(dtype).view(shape)

    def send(self, peer: int, key: MsgKey, tensors: Sequence[Optional[torch.Tensor]]) -> None:
        """Post a non-blocking send of ``tensors`` to ``peer``."""
        header = encode_header(tensors)
        keep: list[Any] = [header]
        tag = make_tag(key, 0, self.num_edges)  # the header's; payload i's is tag + 1 + i
        reqs = [self.comm.Isend([header, self._INT64], dest=peer, tag=tag)]
        for i, t in enumerate(tensors):
            if t is None or t.numel() == 0:
                continue
            src = t.detach()
            if src.device.type != "cpu" or not src.is_contiguous():
                staged = torch.empty(src.shape, dtype=src.dtype,
                                     pin_memory=self._pin and src.device.type != "cpu")
                staged.copy_(src)
                src = staged
            keep.append(src)
            reqs.append(self.comm.Isend([_as_bytes(src), self._BYTE], dest=peer, tag=tag + 1 + i))
        for r in reqs:
            self._sends.append((r, keep))

    def recv(self, peer: int, key: MsgKey) -> PendingRecv:
        """Post the receive of one message from ``peer``; :meth:`PendingRecv.wait` it later."""
        header = np.empty(HEADER_LEN, dtype=np.int64)
        req = self.comm.Irecv([header, self._INT64], source=peer,
                              tag=make_tag(key, 0, self.num_edges))
        return PendingRecv(self, peer, key, header, req)

    def wait_all(self, reqs: list[Any], what: Callable[[], str]) -> None:
        """Wait for any MPI ``reqs`` with a deadline; spin briefly, then yield the core between tests.

        Raises:
            P2PTimeout: after ``timeout`` seconds (or 10 s after a stop signal),
                naming this rank and what it waited for.
        """
        if not reqs or self._Request.Testall(reqs):
            return
        t0 = time.monotonic()
        spins = 0
        with waits.waiting(what):  # what a hang report says this rank waits for
            while not self._Request.Testall(reqs):
                spins += 1
                if spins > 2000:  # a few ms of spinning; then leave the core to others
                    time.sleep(0.0002)
                waited = time.monotonic() - t0
                if waited > self.timeout or (self.stop_requested and waited > STOP_GRACE_S):
                    why = "stopped by a signal" if waited <= self.timeout else "timed out"
                    waits.freeze()
                    raise P2PTimeout(f"{self.me} {why} after waiting {waited:.0f} s for {what()} "
                                     "(is that rank alive and running the same schedule?)")

    def wait_sends(self) -> None:
        """Complete every posted send (their buffers may then be reused)."""
        self.wait_all([r for r, _ in self._sends], lambda: f"{len(self._sends)} sends to be received")
        self._sends.clear()

    def drain_sends(self) -> None:
        """Forget sends that have completed (keeps the pending list short)."""
        if len(self._sends) > 64:
            self._sends = [(r, k) for r, k in self._sends if not r.Test()]

