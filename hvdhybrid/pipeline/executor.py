"""The executor: runs one rank's action list for a step over every stage the rank holds.

A rank runs the stages that the :class:`~hvdhybrid.layout.placement.Placement` puts on
its stage group. Activations and gradients between stages on different ranks
move with :mod:`p2p`; between two stages of the same rank they are handed over
in memory, through the same autograd boundary (a detached leaf downstream, its
``.grad`` sent back), so a local edge computes exactly what a remote one does.

Actions (:mod:`schedule`): ``F`` runs a stage's forward; ``B`` its backward
(input and weight gradients together, unless the plan has a ``W`` for that
stage and microbatch: then ``B`` computes only the input gradients, which
unblocks the upstream stage, and ``W`` the weight gradients later).

Why over 350 lines: running an action is one concept whose parts share the
step's state (posted receives, local hand-overs, re-batching between widths,
token slices and their caches, split backward); cut apart, each piece would
reach back into the others.

Frames (why gradients are rescaled between stages of different widths): each
replica of a stage computes as if its rows were the whole batch, so the loss of
a sink replica is the mean over *its* rows, and the parameter gradients of the
``w`` replicas of a stage are *averaged*. A gradient that crosses an edge from
a stage of width ``w_d`` to one of width ``w_u`` is therefore multiplied by
``w_u / w_d`` on arrival. With equal widths that factor is 1.

Tensor ranks: every tensor rank of a replica runs the same actions on the
same rows; it exchanges activations only with the same tensor rank of the
neighbouring stage groups (tensor-parallel layers keep their outputs whole).

Token slices (TeraPipe): with ``slices`` lengths given to :meth:`Executor.run`,
an action names a slice of its microbatch's sequences. The batch stage gets
the slice's tokens (``inputs[:, start:stop]``), the sink its targets, and
every stage is called with ``cache=`` the :class:`~hvdhybrid.pipeline.kvcache.SliceCache`
of its (stage, microbatch), in which attention keeps the keys and values of
earlier slices. The sink weighs a slice's loss (a mean over its tokens) by
its share of the sequence, so the slices' losses sum to the sequence's. A
backward adds the gradients that later slices left on this slice's keys and
values to its roots. Messages carry each slice's own shape in their header.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from torch import nn

from .. import waits
from ..comm.p2p import P2P, MsgKey, PendingRecv
from ..layout.placement import Placement
from ..layout.rows import Piece, transfer_pieces
from ..layout.topology import Layout, RankCoord
from ..parallel import randomness, recompute
from ..parallel.graph import StageGraph
from ..parallel.recompute import Recompute
from . import trace
from .kvcache import SliceCache
from .saved import SavedBytes
from .schedules import Action
from .split_backward import WeightJob, backward_input, backward_weight

__all__ = ["Executor", "StepResult", "StageShapeError"]

Tensors = tuple[Optional[torch.Tensor], ...]
BatchFn = Callable[[int], tuple[Any, Any]]
LOCAL = -1  # the "peer" of an inbound piece that came from a stage on this rank


class StageShapeError(RuntimeError):
    """A stage received something it cannot use; the message names both stages and the microbatch."""


@dataclass
class StepResult:
    loss_sum: float = 0.0  # sum over microbatches of the unscaled replica loss
    outputs: list[Any] = field(default_factory=list)  # sink outputs (forward-only runs)
    microbatches: int = 0


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return tuple(out)
    raise StageShapeError(f"a stage must return a tensor or a tuple of tensors, got {type(out)}")


def _unpack(msg: tuple[torch.Tensor, ...]) -> Any:
    return msg[0] if len(msg) == 1 else msg


def _tokens(t: Any, cache: SliceCache) -> Any:
    """The current slice's tokens of a batch of sequences (dimension 1)."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[1] != cache.total:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise StageShapeError(f"token slices {list(cache.lengths)} cut dimension 1 of the inputs and "
                              f"targets into a sequence of {cache.total} tokens, but got {got}")
    return t[:, cache.start:cache.stop]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """What a local edge hands downstream: a leaf like one received over MPI."""
    out = t.detach()
    return out.requires_grad_() if t.requires_grad else out


@dataclass
class _Inbound:
    """Activations of one microbatch from one upstream edge: pieces as received."""

    src_stage: int
    pieces: list[tuple[int, Tensors]]  # (peer rank or LOCAL, tensors as autograd leaves), in row order


@dataclass
class _Saved:
    """What a forward leaves for the backward (and the weight-gradient pass) of one microbatch."""

    inbound: list[_Inbound]
    out: tuple[torch.Tensor, ...]
    loss: Optional[torch.Tensor]
    job: Optional[WeightJob] = None  # what a split B leaves for its W
    cache: Optional[SliceCache] = None  # token slices: the (stage, microbatch) cache


class Executor:
    """Runs action lists for one rank, over every stage it holds.

    Args:
        graph: the bundle's stage graph.
        layout: widths and rank numbering (bundle-local ranks are used as peers).
        placement: which stage group runs each stage.
        coord: this rank's coordinates.
        modules: this rank's stages, ``stage -> module``.
        p2p: transport on the bundle communicator.
        loss_fn: ``loss_fn(output, target)``, a mean over rows; used on the sink only.
        autocast: a factory of the context each forward and loss runs in (mixed
            precision, :mod:`precision`); default: none.
    """

    def __init__(self, graph: StageGraph, layout: Layout, placement: Placement, coord: RankCoord,
                 modules: dict[int, nn.Module], p2p: P2P,
                 loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
                 autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
                 recompute: Optional[Recompute] = None) -> None:
        if graph.num_stages != placement.num_stages:
            raise ValueError(f"graph has {graph.num_stages} stages, placement {placement.num_stages}")
        if placement.num_positions != layout.num_stages:
            raise ValueError(f"placement uses {placement.num_positions} stage groups, "
                             f"layout has {layout.num_stages}")
        mine = placement.stages_on(coord.stage)
        if sorted(modules) != mine:
            raise ValueError(f"rank {coord.rank} runs stages {mine}, got modules of {sorted(modules)}")
        self.graph, self.layout, self.placement, self.coord = graph, layout, placement, coord
        self.modules, self.p2p, self.loss_fn = modules, p2p, loss_fn
        self.autocast = autocast
        self.recompute = recompute or Recompute()
        #: bytes of activations kept for the backward (live, peak), counted by saved-tensor hooks
        self.saved = SavedBytes()
        self.saved.exclude(p for m in modules.values() for p in m.parameters())
        self.replica = coord.replica
        self.width = layout.widths[coord.stage]
        self._mailbox: dict[tuple[int, int, int, int, int], Tensors] = {}
        self._rows_fn: Optional[Callable[[int], Sequence[int]]] = None
        self._slices: Optional[tuple[int, ...]] = None
        #: told when a stage's last weight-gradient action of a step runs (``final_begin(stage)``,
        #: ``final_end(stage)``): ``--zero 2`` sends gradients to their owners as they become final
        self.grad_watch: Optional[Any] = None

    # -- who talks to whom ---------------------------------------------------
    def _w(self, stage: int) -> int:
        return self.layout.widths[self.placement.position_of(stage)]

    def _local(self, stage: int) -> bool:
        return stage in self.modules

    def _peer(self, stage: int, replica: int) -> int:
        return self.layout.bundle_local_rank(self.placement.position_of(stage), replica, self.coord.tensor)

    def _in_peers(self, up: int) -> list[int]:
        """Source replicas of stage ``up`` that send rows to this replica, in row order."""
        w_up = self._w(up)
        return [p.src_replica for p in transfer_pieces(w_up * self.width, w_up, self.width)
                if p.dst_replica == self.replica]

    def _out_peers(self, down: int) -> list[int]:
        w_down = self._w(down)
        return [p.dst_replica for p in transfer_pieces(self.width * w_down, self.width, w_down)
                if p.src_replica == self.replica]

    def _key(self, src: int, dst: int, mb: int, direction: int, sl: int = 0) -> MsgKey:
        n = len(self._slices) if self._slices else 1
        return MsgKey(self.graph.edge_index(src, dst), mb, direction, src, dst, sl, n)

    # -- one step --------------------------------------------------------------
    def run(self, actions: Sequence[Action], batch_fn: BatchFn, microbatches: int,
            loss_scale: float = 1.0, train: bool = True,
            rows_fn: Optional[Callable[[int], Sequence[int]]] = None,
            slices: Optional[Sequence[int]] = None, last_pass: bool = True) -> StepResult:
        """Run ``actions`` (this rank's list of the plan) for one step.

        Args:
            actions: this stage group's action list (from :mod:`schedule`).
            batch_fn: ``mb -> (inputs, targets)`` for this replica's rows of microbatch ``mb``.
            microbatches: number of microbatches in the step.
            loss_scale: the sink multiplies each microbatch loss by this before
                backward (``1 / (microbatches * accumulation)``).
            train: build graphs and run backwards; ``False`` runs forwards under no_grad.
            rows_fn: ``mb -> data-set indices`` of this replica's rows of ``mb``; set for
                every forward (:func:`randomness.set_rows`) so that keyed dropout
                draws the same mask for a row on any rank.
            slices: token slices (TeraPipe): the length of each slice of every
                sequence, along dimension 1 of the inputs and targets; the
                actions name slices of ``0 .. len(slices) - 1``. ``None``: whole sequences.
            last_pass: the step's last accumulation pass: each stage's last weight-gradient action
                in it leaves that stage's gradients final (:attr:`grad_watch` is told).
        """
        g = self.graph
        self._rows_fn = rows_fn
        self._slices = tuple(slices) if slices is not None and len(slices) > 1 else None
        if self._slices:
            for s, m in self.modules.items():
                if "cache" not in inspect.signature(m.forward).parameters:
                    raise StageShapeError(
                        f"stage {s} ({type(m).__name__}) takes no cache= argument: token slices need "
                        "stages that keep their attention keys and values in a SliceCache "
                        "(hvdhybrid.models.gpt); run without --slices")
        units = [(mb, i) for mb in range(microbatches) for i in range(len(self._slices or (0,)))]
        result = StepResult(microbatches=microbatches)
        # Receives first: every header this step will need, before any send.
        fwd: dict[tuple[int, int, int, int], list[PendingRecv]] = {}
        bwd: dict[tuple[int, int, int, int], list[PendingRecv]] = {}
        for mb, sl in units:
            for s in self.modules:
                for up in g.upstream(s):
                    if not self._local(up):
                        fwd[(up, s, mb, sl)] = [self.p2p.recv(self._peer(up, i), self._key(up, s, mb, 0, sl))
                                                for i in self._in_peers(up)]
                if train:
                    for down in g.downstream(s):
                        if not self._local(down):
                            bwd[(s, down, mb, sl)] = [
                                self.p2p.recv(self._peer(down, j), self._key(s, down, mb, 1, sl))
                                for j in self._out_peers(down)]
        pending = [r for rs in list(fwd.values()) + list(bwd.values()) for r in rs]
        split_w = {(a.stage, m, a.slice) for a in actions if a.kind == "W" for m in a.mbs}
        batches: dict[int, tuple[Any, Any]] = {}
        saved: dict[tuple[int, int, int], _Saved] = {}
        caches: dict[tuple[int, int], SliceCache] = {}

        def batch(mb: int) -> tuple[Any, Any]:
            if mb not in batches:
                batches[mb] = batch_fn(mb)
            return batches[mb]

        every = bool(getattr(self.grad_watch, "every", False))  # a round per weight-gradient action
        watch = self.grad_watch if train and (last_pass or every) else None
        w_acts = {} if watch is None else {i: a.stage for i, a in enumerate(actions)
                                           if a.kind == "W" or (a.kind == "B" and
                                                                (a.stage, a.mb, a.slice) not in split_w)}
        last_w = set(w_acts) if every else {i for i in {s: i for i, s in w_acts.items()}.values()}
        for i, act in enumerate(actions):
            final = i in last_w  # each stage's last weight-gradient action (every one, with ``every``)
            if final:
                watch.final_begin(act.stage)  # type: ignore[union-attr]
            waits.set_action(act)
            with trace.span(str(act), act.kind):
                key = (act.stage, act.mb, act.slice)
                if act.kind == "F":
                    cache = None
                    if self._slices:
                        cache = caches.setdefault((act.stage, act.mb), SliceCache(self._slices))
                        cache.begin(act.slice)
                    with torch.set_grad_enabled(train):
                        sv = self._forward(act.stage, act.mb, act.slice, batch, fwd, loss_scale, result,
                                           train, cache)
                    if train:
                        saved[key] = sv
                    if act.slice + 1 == len(self._slices or (0,)) and not train:
                        caches.pop((act.stage, act.mb), None)
                elif act.kind == "B":
                    sv = saved[key] if key in split_w else saved.pop(key)
                    self._backward(act.stage, act.mb, act.slice, sv, bwd, weights=key not in split_w)
                    if act.slice == 0:
                        caches.pop((act.stage, act.mb), None)
                elif act.kind == "W":  # one microbatch's, or (batched) several as one product
                    self._weights(act.stage, [saved.pop((act.stage, m, act.slice)) for m in act.mbs])
                # "R": the stage's reduce is all in flight (its buckets started in its last backward)
            if final:
                watch.final_end(act.stage)  # type: ignore[union-attr]
            for r in pending:
                r.poll()
            self.p2p.drain_sends()
        waits.set_action(None)
        self.p2p.wait_sends()
        self._mailbox.clear()
        return result

    def _forward(self, s: int, mb: int, sl: int, batch: BatchFn,
                 fwd: dict[tuple[int, int, int, int], list[PendingRecv]],
                 loss_scale: float, result: StepResult, train: bool,
                 cache: Optional[SliceCache]) -> _Saved:
        g = self.graph
        needs_batch = s in g.batch_stages or s == g.sink
        inputs, targets = batch(mb) if needs_batch else (None, None)
        if cache is not None and needs_batch:
            inputs, targets = _tokens(inputs, cache), _tokens(targets, cache)
        args: list[Any] = [inputs] if s in g.batch_stages else []
        inbound = []
        for up in g.upstream(s):
            if self._local(up):
                msg = self._mailbox.pop((up, s, mb, sl, 0))
                inbound.append(_Inbound(up, [(LOCAL, msg)]))
                args.append(_unpack(msg))  # type: ignore[arg-type]
                continue
            w_up = self._w(up)
            msgs = [r.wait() for r in fwd.pop((up, s, mb, sl))]
            pieces = [(self._peer(up, i), m) for i, m in zip(self._in_peers(up), msgs)]
            inbound.append(_Inbound(up, pieces))
            if len(msgs) == 1:
                joined = msgs[0]
            else:
                try:
                    joined = tuple(torch.cat([m[k] for m in msgs], 0)  # type: ignore[misc]
                                   for k in range(len(msgs[0])))
                except (RuntimeError, TypeError) as e:
                    shapes = [[None if t is None else tuple(t.shape) for t in m] for m in msgs]
                    raise StageShapeError(
                        f"stage {s} replica {self.replica} cannot join microbatch {mb} from the "
                        f"{w_up} replicas of stage {up}: shapes {shapes} ({e})") from None
            if any(t is None for t in joined):
                raise StageShapeError(f"stage {s} got an empty tensor from stage {up}, microbatch {mb}")
            args.append(_unpack(joined))  # type: ignore[arg-type]
        randomness.set_rows(self._rows_fn(mb) if self._rows_fn is not None else None)
        mode = self.recompute.mode_of(s) if train else "none"
        module = self.modules[s]
        with self.autocast(), self.saved.hooks(), recompute.selective(mode == "selective"):
            if mode == "full":  # keep the inputs only; the forward runs again in the backward
                out = _as_tuple(recompute.full(module, *args))
            else:
                out = _as_tuple(module(*args) if cache is None else module(*args, cache=cache))
        loss = None
        if s == g.sink:
            if train:
                if self.loss_fn is None:
                    raise ValueError("the sink stage needs a loss function")
                with self.autocast(), self.saved.hooks():
                    loss = self.loss_fn(_unpack(out), targets)
                if loss.dtype in (torch.float16, torch.bfloat16):
                    loss = loss.float()
                if cache is not None:  # a mean over the slice's tokens -> its share of the sequence's mean
                    loss = loss * (cache.lengths[sl] / cache.total)
                result.loss_sum += float(loss.detach())
                loss = loss * loss_scale
            else:
                result.outputs.append((_unpack(out), targets))
        else:
            self._send_rows(s, mb, sl, out)
        return _Saved(inbound, out, loss, cache=cache)

    def _send_rows(self, s: int, mb: int, sl: int, out: tuple[torch.Tensor, ...]) -> None:
        """Send this replica's output rows of ``mb`` to every downstream replica that needs them."""
        for down in self.graph.downstream(s):
            if self._local(down):
                self._mailbox[(s, down, mb, sl, 0)] = tuple(_leaf(t) for t in out)
                continue
            w_down = self._w(down)
            if w_down == self.width:
                self.p2p.send(self._peer(down, self.replica), self._key(s, down, mb, 0, sl), out)
                continue
            if any(t.dim() == 0 or t.shape[0] != out[0].shape[0] for t in out):
                raise StageShapeError(
                    f"stage {s} (width {self.width}) feeds stage {down} (width {w_down}): re-batching "
                    f"between widths splits rows, so every output needs the same first dimension; "
                    f"got {[tuple(t.shape) for t in out]}. Give both stages the same width")
            rows = out[0].shape[0] * self.width
            for p in transfer_pieces(rows, self.width, w_down):
                if p.src_replica == self.replica:
                    part = tuple(t[p.src_start:p.src_stop] for t in out)
                    self.p2p.send(self._peer(down, p.dst_replica), self._key(s, down, mb, 0, sl), part)

    def _output_grads(self, s: int, mb: int, sl: int, out: tuple[torch.Tensor, ...],
                      bwd: dict[tuple[int, int, int, int], list[PendingRecv]]
                      ) -> list[Optional[torch.Tensor]]:
        """Gradients of ``s``'s outputs of ``mb``: summed over downstream stages, in this replica's frame."""
        grads: list[Optional[torch.Tensor]] = [None] * len(out)
        for down in self.graph.downstream(s):
            if self._local(down):
                msgs: list[Tensors] = [self._mailbox.pop((s, down, mb, sl, 1))]
                plan = [Piece(self.replica, self.replica, 0, out[0].shape[0], 0)]
                w_down = self.width
            else:
                w_down = self._w(down)
                msgs = [r.wait() for r in bwd.pop((s, down, mb, sl))]
                if w_down == self.width:
                    plan = [Piece(self.replica, self.replica, 0, out[0].shape[0], 0)]
                else:
                    rows = out[0].shape[0] * self.width
                    plan = [p for p in transfer_pieces(rows, self.width, w_down)
                            if p.src_replica == self.replica]
            scale = self.width / w_down
            for p, m in zip(plan, msgs):
                if len(m) != len(out):
                    raise StageShapeError(
                        f"stage {s} expected gradients for {len(out)} outputs of microbatch "
                        f"{mb} from stage {down}, got {len(m)}")
                for k, gk in enumerate(m):
                    if gk is None:
                        continue
                    # equal widths: whole outputs, whatever their row counts (atoms vs bonds)
                    want = out[k].shape if w_down == self.width else \
                        out[k][p.src_start:p.src_stop].shape
                    if gk.shape != want:
                        raise StageShapeError(
                            f"stage {s} got gradient {tuple(gk.shape)} for output {k} of "
                            f"microbatch {mb} from stage {down}, expected {tuple(want)}")
                    if scale != 1.0:
                        gk = gk * scale
                    if len(plan) > 1:  # a piece of the rows: place it in a full-size gradient
                        full = torch.zeros_like(out[k])
                        full[p.src_start:p.src_stop] = gk
                        gk = full
                    grads[k] = gk if grads[k] is None else grads[k] + gk  # type: ignore[operator]
        return grads

    def _backward(self, s: int, mb: int, sl: int, sv: _Saved,
                  bwd: dict[tuple[int, int, int, int], list[PendingRecv]], weights: bool) -> None:
        """Input gradients (and, unless a W follows, weight gradients) of ``s`` for ``mb`` (slice ``sl``)."""
        if sv.loss is not None:
            roots: list[torch.Tensor] = [sv.loss]
            grads: list[Optional[torch.Tensor]] = [None]
        else:
            got = self._output_grads(s, mb, sl, sv.out, bwd)
            pairs = [(o, gr) for o, gr in zip(sv.out, got) if gr is not None and o.requires_grad]
            roots, grads = [o for o, _ in pairs], [gr for _, gr in pairs]
        if sv.cache is not None:  # what later slices' attention sent back to this slice's keys and values
            for kv, gr in sv.cache.carried(sl):
                roots.append(kv)
                grads.append(gr)
        if roots:
            if weights:
                torch.autograd.backward(roots, grads)
            else:
                leaves = [t for ib in sv.inbound for _, ts in ib.pieces for t in ts
                          if t is not None and t.requires_grad]
                if sv.cache is not None:
                    leaves += sv.cache.used(sl)
                sv.job = backward_input(roots, grads, leaves,
                                        [p for p in self.modules[s].parameters() if p.requires_grad],
                                        whole=sv.cache is not None)
        # Input gradients go back to the replicas (or the local stage) that sent the rows.
        for ib in sv.inbound:
            for peer, tensors in ib.pieces:
                grads_in = tuple(t.grad if (t is not None and t.requires_grad) else None
                                 for t in tensors)
                if peer == LOCAL:
                    self._mailbox[(ib.src_stage, s, mb, sl, 1)] = grads_in
                else:
                    self.p2p.send(peer, self._key(ib.src_stage, s, mb, 1, sl), grads_in)

    def _weights(self, s: int, svs: list[_Saved]) -> None:
        """The weight gradients of backwards that ran split (``B`` then ``W``), of one microbatch or,
        batched, several."""
        jobs = [sv.job for sv in svs if sv.job is not None]
        if jobs:
            backward_weight(jobs, [p for p in self.modules[s].parameters() if p.requires_grad])
        for sv in svs:
            sv.job = None
