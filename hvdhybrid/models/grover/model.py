"""GROVER's GTransformer: node-view and edge-view encoders built from dyMPN + attention blocks.

One block (``MTBlock``) of a view: Q, K and V are each produced by a dynamic
message-passing network (dyMPN: a number of hops drawn per step during
training), then multi-head attention runs over the atoms (node view) or the
directed bonds (edge view) of each molecule, with a long-range residual from
the block's input, and a feed-forward layer.

The two views give four embeddings (GROVER's ``atom_from_atom``,
``bond_from_atom``, ``atom_from_bond``, ``bond_from_bond``): each view's
hidden states, plus their translation to the other kind of element (atoms
gather their incoming bonds; a bond takes its source atom).

Hop counts come from :mod:`hvdhybrid.parallel.randomness`, keyed by (seed, step,
layer), so every layout draws what one process draws.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...parallel import randomness
from ...parallel.dropout import SegmentDropout
from .config import CONFIGS, GroverConfig
from .features import ATOM_FDIM, BOND_INPUT_FDIM, GraphBatch

__all__ = ["GroverConfig", "CONFIGS", "MTBlock", "Readout", "pad_by_scope"]


def zero_pad(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its padding row (row 0) set to zero, out of place.

    Every layer must keep that row zero: padded neighbour slots point at it, and
    how many a row has depends on the other molecules in the batch, so a
    non-zero padding row makes a molecule's result depend on its batch (the
    transparency test caught this after two optimizer steps had made the
    biases non-zero).
    """
    return torch.cat([torch.zeros_like(x[:1]), x[1:]])


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for an index of any shape (row 0 of ``x`` is the zero padding row)."""
    return x.index_select(0, index.reshape(-1)).reshape(*index.shape, x.shape[-1])


def pad_by_scope(x: torch.Tensor, scope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of each molecule into a padded [molecules, longest, d] tensor.

    Returns:
        (padded, mask [molecules, longest] True where a row exists, flat row index per slot).
    """
    starts, sizes = scope[:, 0], scope[:, 1]
    longest = int(sizes.max()) if sizes.numel() else 0
    ar = torch.arange(max(longest, 1), device=x.device)
    mask = ar.unsqueeze(0) < sizes.unsqueeze(1)
    index = torch.where(mask, starts.unsqueeze(1) + ar.unsqueeze(0), torch.zeros_like(mask, dtype=torch.long))
    return gather(x, index), mask, index


class DyMPN(nn.Module):
    """Message passing over atoms (node view) or directed bonds (edge view), a drawn number of hops."""

    def __init__(self, hidden: int, edge_view: bool, hops: int, key: str) -> None:
        super().__init__()
        self.w = nn.Linear(hidden, hidden)
        self.edge_view, self.hops, self.key = edge_view, hops, key

    def n_hops(self) -> int:
        if not self.training:
            return self.hops
        return max(1, randomness.randint(self.hops - 1, self.hops + 1, "dympn", self.key))

    def forward(self, h: torch.Tensor, g: GraphBatch) -> torch.Tensor:
        m = h
        for _ in range(self.n_hops()):
            if self.edge_view:  # bond b=(u->v): messages into u, minus the one from v->u
                into_atom = gather(m, g.a2b).sum(1)
                msg = into_atom.index_select(0, g.b2a) - m.index_select(0, g.b2revb)
            else:
                msg = gather(m, g.a2a).sum(1)
            m = zero_pad(torch.relu(self.w(msg) + h))
        return m


class MTBlock(nn.Module):
    """dyMPN-generated Q, K, V; attention within each molecule; residual; feed-forward."""

    def __init__(self, in_dim: int, cfg: GroverConfig, edge_view: bool, key: str) -> None:
        super().__init__()
        d = cfg.hidden
        self.inp = nn.Linear(in_dim, d)
        self.q, self.k, self.v = (DyMPN(d, edge_view, cfg.hops, f"{key}.{n}") for n in "qkv")
        # the module holds the attention's parameters; its forward is written out in
        # _attend so that attention dropout is keyed by molecule (see hvdhybrid.parallel.dropout)
        self.attn = nn.MultiheadAttention(d, cfg.heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
        self.drop_attn = SegmentDropout(cfg.dropout, f"{key}.attn")
        self.drop_out = SegmentDropout(cfg.dropout, f"{key}.out")
        self.drop_ffn = SegmentDropout(cfg.dropout, f"{key}.ffn")
        self.edge_view = edge_view

    def forward(self, x: torch.Tensor, g: GraphBatch) -> torch.Tensor:
        h = zero_pad(torch.relu(self.inp(x)))
        scope = g.b_scope if self.edge_view else g.a_scope
        q, qm, idx = pad_by_scope(self.q(h, g), scope)
        k, _, _ = pad_by_scope(self.k(h, g), scope)
        v, _, _ = pad_by_scope(self.v(h, g), scope)
        out = self._attend(q, k, v, qm, scope[:, 1].tolist())
        flat = torch.zeros_like(h).index_put((idx[qm],), out[qm])
        y = self.norm1(h + self.drop_out(flat, scope))  # long-range residual from the block's input
        return zero_pad(self.norm2(y + self.drop_ffn(self.ffn(y), scope)))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                sizes: list[int]) -> torch.Tensor:
        """``nn.MultiheadAttention`` over each molecule's rows (exact softmax), keyed dropout on the
        attention probabilities. A padded key gets the lowest finite score, not -inf, so that a
        molecule without bonds (edge view) gives finite values and gradients."""
        a = self.attn
        m, n, e = q.shape
        heads = a.num_heads
        w, b = a.in_proj_weight, a.in_proj_bias
        assert b is not None

        def proj(x: torch.Tensor, i: int) -> torch.Tensor:
            y = nn.functional.linear(x, w[i * e:(i + 1) * e], b[i * e:(i + 1) * e])
            return y.view(m, n, heads, e // heads).transpose(1, 2)

        scores = torch.matmul(proj(q, 0), proj(k, 1).transpose(-1, -2)) / math.sqrt(e // heads)
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = self.drop_attn.square(torch.softmax(scores, dim=-1), sizes)
        out = torch.matmul(probs, proj(v, 2)).transpose(1, 2).reshape(m, n, e)
        y: torch.Tensor = a.out_proj(out)
        return y


def view_blocks(cfg: GroverConfig, edge_view: bool) -> nn.ModuleList:
    first = BOND_INPUT_FDIM if edge_view else ATOM_FDIM
    name = "edge" if edge_view else "node"
    return nn.ModuleList(MTBlock(first if i == 0 else cfg.hidden, cfg, edge_view, f"{name}{i}")
                         for i in range(cfg.layers))


class Embeddings(nn.Module):
    """A view's hidden states -> (atom embedding, bond embedding), GROVER's four outputs in pairs."""

    def __init__(self, hidden: int, edge_view: bool) -> None:
        super().__init__()
        self.edge_view = edge_view
        self.to_atom = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
        self.to_bond = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())

    def forward(self, h: torch.Tensor, g: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.edge_view:  # h: bonds; atoms gather their incoming bonds
            atom_in, bond_in = gather(h, g.a2b).sum(1), h
        else:  # h: atoms; a bond takes its source atom and its target's other neighbours
            atom_in, bond_in = h, h.index_select(0, g.b2a)
        return zero_pad(self.to_atom(atom_in)), zero_pad(self.to_bond(bond_in))


class Readout(nn.Module):
    """Mean of a molecule's atom embeddings (then its ``extra`` features, if any), then a two-layer head."""

    def __init__(self, hidden: int, ffn: int, out: int, dropout: float, extra: int = 0) -> None:
        super().__init__()
        self.extra = extra
        self.mlp = nn.Sequential(nn.Linear(hidden + extra, ffn), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(ffn, out))

    @staticmethod
    def pool(atoms: torch.Tensor, g: GraphBatch) -> torch.Tensor:
        padded, mask, _ = pad_by_scope(atoms, g.a_scope)
        return (padded * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

    def forward(self, atoms: torch.Tensor, g: GraphBatch) -> torch.Tensor:
        h = self.pool(atoms, g)
        if self.extra:
            f = g.mol_features
            if f is None or f.shape != (h.shape[0], self.extra):
                got = "none" if f is None else list(f.shape)
                raise ValueError(f"this readout needs {self.extra} features per molecule, got {got}")
            h = torch.cat([h, f.to(h.dtype)], 1)
        out: torch.Tensor = self.mlp(h)
        return out


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def init_(module: nn.Module) -> None:
    """Xavier for matrices, zeros for biases: GROVER's initialisation."""
    for n, p in module.named_parameters():
        if p.dim() > 1:
            nn.init.xavier_normal_(p)
        elif n.endswith("bias"):
            nn.init.zeros_(p)
