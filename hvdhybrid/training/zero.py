"""Optimizer state (``--zero 1``) and averaged gradients (``--zero 2``) sharded over each data group.

A data group is the ranks that hold the same piece of the model across bundles.
Its ``d`` members put their parameters into one flat buffer, in the same order
(the parameters become views of it), padded to a multiple of ``d``. Member ``r``
owns elements ``[r * n, (r + 1) * n)``: the inner optimizer (the user's, for one
flat parameter: the shard) keeps state for that share only, steps it, and the
updated shares are all-gathered back into every member's buffer.

- level 1: gradients are averaged as before (every member holds them whole until
  the step); each member copies out its share for the step.
- level 2: instead of the data-group all-reduce, each chunk of the flat gradients
  (at most :data:`CHUNK` elements, never straddling two shares) is summed onto
  the member that owns it (fp16 on the wire when asked, as the all-reduce), and
  a whole gradient is freed once every chunk it touches is sent: after the sync a
  member holds only the average of its share. Chunks go in a fixed order (from
  the end of the buffer: the order a backward finishes parameters in), and, when
  the executor says which action is a stage's last weight-gradient action of
  the step (:meth:`ZeroOptimizer.watch`), during that backward, as each chunk's
  parameters become final: the whole gradients never exist all at once. With
  accumulation (microbatches, passes) the earlier microbatches' whole gradients
  are held until then; ``--reduce microbatch`` instead sends every chunk at the
  end of each weight-gradient action (owners add the sums up), so no whole
  gradient outlives the action that made it, for M times the traffic.

The gradient guard sees the same norm as unsharded: each element of a share
counts with its parameter's weight (replicated copies down-weighted, ties once)
and once across the data group (:meth:`GradSync.norm_share`). Only optimizers
whose step is elementwise can be sharded this way; others are refused by name.
Checkpoints: every member writes its share as it holds it, and the manifest
names, per parameter, which flat range of it each share file holds
(:meth:`NamedState.share_file`); a load joins a parameter's state whole by name
and each member cuts its share back out (:meth:`absorb_loaded_state`), so a run
saved at one zero level and layout resumes at any other, and no rank ever holds
the whole state to save it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import InputError
from .final_grads import FinalGrads

__all__ = ["CHUNK", "ELEMENTWISE", "ZeroError", "ZeroOptimizer"]

#: elements of flat gradients per level-2 reduction (8 MB in float32)
CHUNK = 1 << 21

#: optimizers whose step treats every element alone (a share can be stepped by itself)
ELEMENTWISE = ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD")


class ZeroError(InputError):
    """An optimizer ZeRO cannot shard."""


def _np(t: torch.Tensor) -> Any:
    return t.numpy()


class ZeroOptimizer:
    """The user's optimizer over this member's share of a flat buffer of ``params``.

    Args:
        params: this rank's parameters, in the order every member of the data group lists them.
        optimizer_fn: ``params -> optimizer`` (called with the one flat share).
        data: the data group's MPI communicator (rank = bundle).
        level: 1 or 2.
        fp16: level 2 sends gradients as float16 (``--fp16-compression``).
    """

    def __init__(self, params: Sequence[nn.Parameter], optimizer_fn: Callable[[list[nn.Parameter]], Any],
                 data: Any, level: int, fp16: bool = False) -> None:
        self.params, self.comm, self.level, self.fp16 = list(params), data, level, fp16
        d, r = data.Get_size(), data.Get_rank()
        self.total = sum(p.numel() for p in self.params)
        self.n = -(-self.total // d) if self.total else 0
        dev = self.params[0].device if self.params else torch.device("cpu")
        self.flat = torch.zeros(self.n * d, dtype=torch.float32, device=dev)
        self.offsets: list[int] = []
        off = 0
        for p in self.params:
            self.offsets.append(off)
            self.flat[off:off + p.numel()].copy_(p.data.reshape(-1))
            p.data = self.flat[off:off + p.numel()].view_as(p)
            off += p.numel()
        self.lo, self.hi = r * self.n, (r + 1) * self.n
        self.part = nn.Parameter(self.flat[self.lo:self.hi])  # shares the buffer's storage
        self.inner = optimizer_fn([self.part])
        kind = type(self.inner).__name__
        if kind not in ELEMENTWISE and not getattr(self.inner, "elementwise", False):
            raise ZeroError(f"--zero shards the optimizer state element by element, and {kind} is not known "
                            f"to step elementwise ({', '.join(ELEMENTWISE)}); use --zero 0, or set "
                            f"elementwise = True on {kind} if its step is")
        if len(self.inner.param_groups) != 1:
            raise ZeroError(f"--zero needs one parameter group; the optimizer has "
                            f"{len(self.inner.param_groups)}")
        #: per parameter, the whole state: filled by a load, then cut to the share (absorb_loaded_state)
        self.state: dict[nn.Parameter, dict[str, Any]] = {}
        self._weights: Optional[list[tuple[int, int, float]]] = None
        self._chunks = self._cut(d)
        self._watch: Optional[FinalGrads] = None
        self._round: Optional[_Round] = None
        self._share: Optional[torch.Tensor] = None  # this member's sums of the step's rounds

    # -- what the trainer uses of an optimizer ---------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups  # type: ignore[no-any-return]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.part.grad = None

    def step(self) -> None:
        """Step this member's share, then all-gather every share into every member's buffer."""
        from mpi4py import MPI

        if self.part.grad is None:  # level 1: the whole averaged gradients are here; into one buffer,
            flat = self.flat_grads()  # the parameters' gradients and the share's all views of it
            for p, off in zip(self.params, self.offsets):
                p.grad = flat[off:off + p.numel()].view_as(p)
            self.part.grad = flat[self.lo:self.hi]
        self.inner.step()
        host = self.flat if self.flat.device.type == "cpu" else self.flat.cpu()
        self.comm.Allgather(MPI.IN_PLACE, _np(host))
        if host is not self.flat:
            self.flat.copy_(host)

    # -- gradients ------------------------------------------------------------------------------
    def flat_grads(self) -> torch.Tensor:
        """The whole gradients in one buffer laid out as :attr:`flat`; each gradient is freed once in."""
        out = torch.zeros_like(self.flat)
        for p, off in zip(self.params, self.offsets):
            if p.grad is not None:
                out[off:off + p.numel()].copy_(p.grad.reshape(-1))
                p.grad = None
        return out

    def _cut(self, d: int) -> list[tuple[int, int, list[int]]]:
        """Level 2's chunks in the order they are sent: ``(start, stop, parameters overlapping)``, from
        the end of the buffer, each inside one member's share."""
        import bisect

        out = []
        for r in reversed(range(d)):
            lo, hi = r * self.n, (r + 1) * self.n
            for a in reversed(range(lo, hi, CHUNK)):
                b = min(a + CHUNK, hi)
                first = max(bisect.bisect_right(self.offsets, a) - 1, 0)
                ps = [i for i in range(first, bisect.bisect_left(self.offsets, b))
                      if self.offsets[i] + self.params[i].numel() > a]
                out.append((a, b, ps))
        return out

    def watch(self, stages: dict[int, Sequence[nn.Parameter]], every: bool = False) -> FinalGrads:
        """Level 2: reduce chunks during the backward, as their parameters become final
        (:class:`~hvdhybrid.training.final_grads.FinalGrads`; the executor's ``grad_watch``).
        ``stages``: this rank's stage -> its parameters. ``every`` (``--reduce microbatch``): a round
        per weight-gradient action, every chunk sent at its end and added onto the share, so no
        whole gradient outlives the action that made it (M times the traffic of one round)."""
        self._watch = FinalGrads(self.params, stages, on_final=lambda i: self._now().final(i),
                                 on_begin=self._now, on_end=self._end_round, every=every)
        return self._watch

    def _now(self) -> _Round:
        if self._round is None:
            if self._share is None:
                self._share = torch.zeros(self.n, dtype=torch.float32, device=self.flat.device)
            self._round = _Round(self, self._share)
        return self._round

    def _end_round(self) -> None:
        """Send every chunk the round has not sent (its sums added onto the share); the next weight-gradient
        action starts another round."""
        rnd = self._now()
        for i in range(len(self.params)):
            rnd.final(i)
        self._round = None
        if self._watch is not None:
            self._watch.reset()

    def reduce_rest(self) -> None:
        """Level 2, at the sync: send every chunk not sent yet; this member's share of the average is
        then :attr:`part`'s gradient, and no whole gradient is left."""
        if self._round is not None or self._watch is None or not self._watch.every:
            self._end_round()  # per round: what is left (at the sync, all of it without a watch)
        share, self._share = self._share, None
        self.part.grad = share if share is not None else torch.zeros(self.n, device=self.flat.device)
        for p in self.params:
            p.grad = None

    def set_weights(self, weight_of: Callable[[nn.Parameter], float]) -> None:
        """Each element of the share weighted as its parameter counts in the global norm: kept as
        ``(start, stop, weight)`` runs over the share, one per parameter it overlaps."""
        self._weights = []
        for p, off in zip(self.params, self.offsets):
            a, b = max(off, self.lo), min(off + p.numel(), self.hi)
            if a < b:
                self._weights.append((a - self.lo, b - self.lo, weight_of(p)))

    def norm_share(self) -> float:
        """Level 2: this member's weighted share of the squared global norm (float64, a chunk at a time)."""
        g = self.part.grad
        if g is None or self._weights is None:
            return 0.0
        return sum(w * sum(float(c.double().pow_(2).sum()) for c in g[a:b].split(1 << 20))
                   for a, b, w in self._weights if w)

    # -- checkpoints ----------------------------------------------------------------------------
    def absorb_loaded_state(self) -> None:
        """After a load filled :attr:`state` with whole per-parameter state: keep this member's share."""
        if not self.state:
            return
        first = self.state.get(self.params[0], {}) if self.params else {}
        new: dict[str, Any] = {}
        for k, v in first.items():
            if torch.is_tensor(v) and v.shape == self.params[0].shape and v.dim() > 0:
                flat = torch.zeros_like(self.flat)
                for p, off in zip(self.params, self.offsets):
                    got = self.state.get(p, {}).get(k)
                    if got is not None:
                        flat[off:off + p.numel()].copy_(got.reshape(-1))
                new[k] = flat[self.lo:self.hi].clone()
            else:
                new[k] = v
        self.inner.state[self.part] = new
        self.state = {}

    def state_bytes(self) -> int:
        st = self.inner.state.get(self.part, {})
        return sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))


class _Round:
    """One step's level-2 reduction: chunks sent in their fixed order as their parameters become final."""

    def __init__(self, zero: ZeroOptimizer, share: torch.Tensor) -> None:
        self.zero, self.share = zero, share
        self.waiting = [len(ps) for _, _, ps in zero._chunks]  # parameters not final, per chunk
        self.chunks_of: dict[int, list[int]] = {}
        for c, (_, _, ps) in enumerate(zero._chunks):
            for i in ps:
                self.chunks_of.setdefault(i, []).append(c)
        self.unsent = {i: len(cs) for i, cs in self.chunks_of.items()}
        self.done: set[int] = set()
        self.next = 0
        self._advance()

    def final(self, i: int) -> None:
        if i in self.done:
            return
        self.done.add(i)
        for c in self.chunks_of.get(i, []):
            self.waiting[c] -= 1
        self._advance()

    def _advance(self) -> None:
        while self.next < len(self.waiting) and self.waiting[self.next] == 0:
            self._send(self.next)
            self.next += 1

    def _send(self, c: int) -> None:
        from ..comm.reduce import reduce_to

        z = self.zero
        a, b, ps = z._chunks[c]
        wire = torch.zeros(b - a, dtype=torch.float16 if z.fp16 else torch.float32)
        for i in ps:
            p, off = z.params[i], z.offsets[i]
            lo, hi = max(a, off), min(b, off + p.numel())
            if p.grad is not None:
                wire[lo - a:hi - a].copy_(p.grad.detach().reshape(-1)[lo - off:hi - off])
        got = reduce_to(z.comm, wire, a // z.n if z.n else 0)
        del wire
        if got is not None:  # the average as Horovod's op=Average makes it: scaled in the wire's type
            avg = got.float().mul_(1.0 / z.comm.Get_size())
            dst = self.share[a - z.lo:b - z.lo]
            dst.add_((avg.half() if z.fp16 else avg).to(dst.device))  # onto 0, or an earlier round's
        for i in ps:
            self.unsent[i] -= 1
            if self.unsent[i] == 0:
                z.params[i].grad = None  # every chunk of it is sent: the whole gradient goes
