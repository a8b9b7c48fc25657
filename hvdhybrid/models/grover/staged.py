"""GROVER cut into stages: pipeline (layers of both views per stage), task parallel, or both.

``--stages K`` (a chain; each stage runs its slice of both views' blocks)::

    [node 0..a, edge 0..a] -> [node a..b, edge a..b] -> ... -> [.., embeddings, heads]

``--task-parallel`` (two chains side by side, joined where the heads are)::

    edge 0..a -> edge a..b -> ... -> edge ..L + edge embeddings --+
                                                                  v
    node 0..a -> node a..b -> ... -> node ..L + node embeddings + heads   (the sink)

Every stage reads the molecular graph from the batch (message passing needs
it); only hidden states travel between stages. A stage module keeps the
full-model attribute names (``node_blocks.3...``), so parameters have the
same names in every layout.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ...parallel.dropout import keyed_dropouts
from ...parallel.graph import StageGraph
from ...parallel.partition import PartitionError
from ...parallel.staged import StagedModel
from .features import GraphBatch
from .model import Embeddings, GroverConfig, Readout, init_, view_blocks

__all__ = ["GroverNet", "PretrainHeads", "FinetuneHeads", "GroverStage", "stage_model"]


class PretrainHeads(nn.Module):
    """Contextual-property classifiers (atoms, bonds) and motif classifiers, one per embedding."""

    def __init__(self, cfg: GroverConfig, atom_vocab: int, bond_vocab: int, motifs: int) -> None:
        super().__init__()
        d = cfg.hidden
        self.atom_aa, self.atom_ab = nn.Linear(d, atom_vocab), nn.Linear(d, atom_vocab)
        self.bond_ba, self.bond_bb = nn.Linear(d, bond_vocab), nn.Linear(d, bond_vocab)
        self.motif_a = Readout(d, cfg.ffn, motifs, cfg.dropout)
        self.motif_b = Readout(d, cfg.ffn, motifs, cfg.dropout)

    def forward(self, aa: torch.Tensor, ba: torch.Tensor, ab: torch.Tensor, bb: torch.Tensor,
                g: GraphBatch) -> tuple[torch.Tensor, ...]:
        return (self.atom_aa(aa), self.atom_ab(ab), self.bond_ba(ba), self.bond_bb(bb),
                self.motif_a(aa, g), self.motif_b(ab, g))


class FinetuneHeads(nn.Module):
    """Two readouts, one from each view's atom embeddings (GROVER's two-head output).

    ``extra``: per-molecule features (``GraphBatch.mol_features``, e.g. RDKit 2D
    descriptors) appended to the pooled embedding of both heads.
    """

    def __init__(self, cfg: GroverConfig, tasks: int, extra: int = 0) -> None:
        super().__init__()
        self.from_atom = Readout(cfg.hidden, cfg.ffn, tasks, cfg.dropout, extra)
        self.from_bond = Readout(cfg.hidden, cfg.ffn, tasks, cfg.dropout, extra)

    def forward(self, aa: torch.Tensor, ba: torch.Tensor, ab: torch.Tensor, bb: torch.Tensor,
                g: GraphBatch) -> tuple[torch.Tensor, ...]:
        return self.from_atom(aa, g), self.from_bond(ab, g)


class GroverNet(nn.Module):
    """The whole model (one process): both views, their embeddings, and the heads."""

    def __init__(self, cfg: GroverConfig, heads: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.node_blocks = view_blocks(cfg, edge_view=False)
        self.edge_blocks = view_blocks(cfg, edge_view=True)
        self.node_emb = Embeddings(cfg.hidden, edge_view=False)
        self.edge_emb = Embeddings(cfg.hidden, edge_view=True)
        self.heads = heads
        keyed_dropouts(self)  # the readouts' dropout, keyed by molecule (the blocks key their own)
        init_(self)

    def forward(self, g: GraphBatch) -> tuple[torch.Tensor, ...]:
        a, b = g.f_atoms, g.f_bonds
        for blk in self.node_blocks:
            a = blk(a, g)
        for blk in self.edge_blocks:
            b = blk(b, g)
        aa, ba = self.node_emb(a, g)
        ab, bb = self.edge_emb(b, g)
        out: tuple[torch.Tensor, ...] = self.heads(aa, ba, ab, bb, g)
        return out


class GroverStage(nn.Module):
    """One stage: a slice of node blocks and/or edge blocks, maybe embeddings and heads.

    Args:
        full: the whole model (its modules are shared, not copied).
        node, edge: which blocks of each view this stage runs (ranges, maybe empty).
        node_in, edge_in: where the view's input comes from: "batch" (raw features),
            "prev" (the previous stage of this chain) or None (the view is not run here).
        edge_out: this stage ends the edge chain and sends its embeddings on.
        sink: this stage computes the node embeddings and the heads.
    """

    def __init__(self, full: GroverNet, node: range, edge: range, node_in: Optional[str],
                 edge_in: Optional[str], edge_out: bool, sink: bool) -> None:
        super().__init__()
        self.node_blocks = nn.ModuleDict({str(i): full.node_blocks[i] for i in node})
        self.edge_blocks = nn.ModuleDict({str(i): full.edge_blocks[i] for i in edge})
        self.node_in, self.edge_in, self.edge_out, self.sink = node_in, edge_in, edge_out, sink
        if edge_out or (sink and edge_in is not None):  # never on two stages at once
            self.edge_emb = full.edge_emb
        if sink:
            self.node_emb, self.heads = full.node_emb, full.heads

    def forward(self, g: GraphBatch, *received: Any) -> Any:
        queue = list(received)
        a = b = None
        if self.node_in is not None and self.edge_in is not None and self.node_in == "prev":
            a, b = queue.pop(0)  # a pipeline stage gets both views' states in one message
        else:
            if self.node_in is not None:
                a = g.f_atoms if self.node_in == "batch" else queue.pop(0)
            if self.edge_in is not None:
                b = g.f_bonds if self.edge_in == "batch" else queue.pop(0)
        for blk in self.node_blocks.values():
            a = blk(a, g)
        for blk in self.edge_blocks.values():
            b = blk(b, g)
        if self.edge_out and not self.sink:
            assert b is not None
            return self.edge_emb(b, g)
        if not self.sink:
            if a is not None and b is not None:
                return a, b
            return a if a is not None else b
        if b is not None:
            ab, bb = self.edge_emb(b, g)
        else:
            ab, bb = queue.pop(0)  # the edge chain's embeddings (task parallel)
        aa, ba = self.node_emb(a, g)
        return self.heads(aa, ba, ab, bb, g)


def _split(n: int, parts: int) -> list[range]:
    if parts > n:
        raise PartitionError(f"cannot split {n} GTransformer layers into {parts} stages; "
                             f"use a config with more layers or at most {n} stages")
    q, r = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = q + (1 if i < r else 0)
        out.append(range(start, start + size))
        start += size
    return out


def stage_model(full: GroverNet, stages: int, task_parallel: bool,
                loss_fn: Callable[[Any, Any], torch.Tensor]) -> StagedModel:
    """Cut ``full`` into a :class:`StagedModel` for ``stages`` per chain (x2 with task parallelism)."""
    cuts = _split(full.cfg.layers, stages)
    k = stages
    if not task_parallel:
        mods: list[nn.Module] = [
            GroverStage(full, cuts[i], cuts[i], "batch" if i == 0 else "prev",
                        "batch" if i == 0 else "prev", False, i == k - 1) for i in range(k)]
        return StagedModel(StageGraph(k, tuple((i, i + 1) for i in range(k - 1)),
                                      frozenset(range(k))), mods, loss_fn)
    empty = range(0)
    edge_stages = [GroverStage(full, empty, cuts[i], None, "batch" if i == 0 else "prev",
                               i == k - 1, False) for i in range(k)]
    node_stages = [GroverStage(full, cuts[i], empty, "batch" if i == 0 else "prev", None,
                               False, i == k - 1) for i in range(k)]
    edges = ([(i, i + 1) for i in range(k - 1)] + [(k + i, k + i + 1) for i in range(k - 1)]
             + [(k - 1, 2 * k - 1)])
    return StagedModel(StageGraph(2 * k, tuple(edges), frozenset(range(2 * k))),
                       [*edge_stages, *node_stages], loss_fn)
