"""The executor: runs one rank's action list for a step, moving tensors with :mod:`p2p`.

Frames (why gradients are rescaled between stages of different widths): each
replica of a stage computes as if its rows were the whole batch, so the loss of
a sink replica is the mean over *its* rows, and the parameter gradients of the
``w`` replicas of a stage are *averaged*. A gradient that crosses an edge from
a stage of width ``w_d`` to one of width ``w_u`` is therefore multiplied by
``w_u / w_d`` on arrival. With equal widths that factor is 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .graph import StageGraph
from .p2p import P2P, MsgKey, PendingRecv
from .schedule import Action
from .slicing import Piece, transfer_pieces
from .topology import Layout, RankCoord

__all__ = ["Executor", "StepResult", "StageShapeError"]

Tensors = tuple[Optional[torch.Tensor], ...]
BatchFn = Callable[[int], tuple[Any, Any]]


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


@dataclass
class _Inbound:
    """Activations of one microbatch from one upstream edge: pieces as received."""

    src_stage: int
    pieces: list[tuple[int, Tensors]]  # (peer rank, tensors as autograd leaves), in row order


class Executor:
    """Runs action lists for one rank of one stage.

    Args:
        graph: the bundle's stage graph.
        layout: widths and rank numbering (bundle-local ranks are used as peers).
        coord: this rank's coordinates.
        module: this stage's part of the model.
        p2p: transport on the bundle communicator.
        loss_fn: ``loss_fn(output, target)``, a mean over rows; used on the sink only.
    """

    def __init__(self, graph: StageGraph, layout: Layout, coord: RankCoord, module: nn.Module,
                 p2p: P2P, loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None) -> None:
        if graph.num_stages != layout.num_stages:
            raise ValueError(f"graph has {graph.num_stages} stages, layout {layout.num_stages}")
        self.graph, self.layout, self.coord = graph, layout, coord
        self.module, self.p2p, self.loss_fn = module, p2p, loss_fn
        self.stage, self.replica = coord.stage, coord.replica
        self.width = layout.widths[self.stage]

    # -- who talks to whom ---------------------------------------------------
    def _peer(self, stage: int, replica: int) -> int:
        return self.layout.bundle_local_rank(stage, replica)

    def _in_peers(self, up: int) -> list[int]:
        """Source replicas of stage ``up`` that send rows to this replica, in row order."""
        w_up = self.layout.widths[up]
        return [p.src_replica for p in transfer_pieces(w_up * self.width, w_up, self.width)
                if p.dst_replica == self.replica]

    def _out_peers(self, down: int) -> list[int]:
        w_down = self.layout.widths[down]
        return [p.dst_replica for p in transfer_pieces(self.width * w_down, self.width, w_down)
                if p.src_replica == self.replica]

    def _key(self, src: int, dst: int, mb: int, direction: int) -> MsgKey:
        return MsgKey(self.graph.edge_index(src, dst), mb, direction, src, dst)

    # -- one step --------------------------------------------------------------
    def run(self, actions: Sequence[Action], batch_fn: BatchFn, microbatches: int,
            loss_scale: float = 1.0, train: bool = True) -> StepResult:
        """Run ``actions`` for one step.

        Args:
            actions: this stage's action list (from :mod:`schedule`).
            batch_fn: ``mb -> (inputs, targets)`` for this replica's rows of microbatch ``mb``.
            microbatches: number of microbatches in the step.
            loss_scale: the sink multiplies each microbatch loss by this before
                backward (``1 / (microbatches * accumulation)``).
            train: build graphs and run backwards; ``False`` runs forwards under no_grad.
        """
        g, s = self.graph, self.stage
        result = StepResult(microbatches=microbatches)
        # Receives first: every header this step will need, before any send.
        fwd: dict[tuple[int, int], list[PendingRecv]] = {}
        bwd: dict[tuple[int, int], list[PendingRecv]] = {}
        for mb in range(microbatches):
            for up in g.upstream(s):
                fwd[(up, mb)] = [self.p2p.recv(self._peer(up, i), self._key(up, s, mb, 0))
                                 for i in self._in_peers(up)]
            if train:
                for down in g.downstream(s):
                    bwd[(down, mb)] = [self.p2p.recv(self._peer(down, j), self._key(s, down, mb, 1))
                                       for j in self._out_peers(down)]
        pending = [r for rs in list(fwd.values()) + list(bwd.values()) for r in rs]
        saved: dict[int, tuple[list[_Inbound], tuple[torch.Tensor, ...], Optional[torch.Tensor]]] = {}

        for act in actions:
            if act.kind == "F":
                with torch.set_grad_enabled(train):
                    inbound, out, loss = self._forward(act.mb, batch_fn, fwd, loss_scale, result, train)
                if train:
                    saved[act.mb] = (inbound, out, loss)
            else:
                inbound, out, loss = saved.pop(act.mb)
                self._backward(act.mb, inbound, out, loss, bwd)
            for r in pending:
                r.poll()
            self.p2p.drain_sends()
        self.p2p.wait_sends()
        return result

    def _forward(self, mb: int, batch_fn: BatchFn, fwd: dict[tuple[int, int], list[PendingRecv]],
                 loss_scale: float, result: StepResult, train: bool,
                 ) -> tuple[list[_Inbound], tuple[torch.Tensor, ...], Optional[torch.Tensor]]:
        g, s = self.graph, self.stage
        needs_batch = s in g.batch_stages or s == g.sink
        inputs, targets = batch_fn(mb) if needs_batch else (None, None)
        args: list[Any] = [inputs] if s in g.batch_stages else []
        inbound = []
        for up in g.upstream(s):
            w_up = self.layout.widths[up]
            msgs = [r.wait() for r in fwd.pop((up, mb))]
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
        out = _as_tuple(self.module(*args))
        loss = None
        if s == g.sink:
            if train:
                if self.loss_fn is None:
                    raise ValueError("the sink stage needs a loss function")
                loss = self.loss_fn(_unpack(out), targets)
                result.loss_sum += float(loss.detach())
                loss = loss * loss_scale
            else:
                result.outputs.append((_unpack(out), targets))
        else:
            self._send_rows(mb, out, direction=0)
        return inbound, out, loss

    def _send_rows(self, mb: int, out: tuple[torch.Tensor, ...], direction: int) -> None:
        """Send this replica's output rows of ``mb`` to every downstream replica that needs them."""
        s = self.stage
        for down in self.graph.downstream(s):
            w_down = self.layout.widths[down]
            if w_down == self.width:
                self.p2p.send(self._peer(down, self.replica), self._key(s, down, mb, 0), out)
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
                    self.p2p.send(self._peer(down, p.dst_replica), self._key(s, down, mb, 0), part)

    def _backward(self, mb: int, inbound: list[_Inbound], out: tuple[torch.Tensor, ...],
                  loss: Optional[torch.Tensor], bwd: dict[tuple[int, int], list[PendingRecv]]) -> None:
        g, s = self.graph, self.stage
        if loss is not None:
            loss.backward()
        else:
            grads: list[Optional[torch.Tensor]] = [None] * len(out)
            for down in g.downstream(s):
                w_down = self.layout.widths[down]
                msgs = [r.wait() for r in bwd.pop((down, mb))]
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
            pairs = [(o, gr) for o, gr in zip(out, grads) if gr is not None and o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [gr for _, gr in pairs])
        # Input gradients go back to the replicas that sent the rows.
        for ib in inbound:
            for peer, tensors in ib.pieces:
                grads_in = tuple(t.grad if (t is not None and t.requires_grad) else None
                                 for t in tensors)
                self.p2p.send(peer, self._key(ib.src_stage, s, mb, 1), grads_in)
