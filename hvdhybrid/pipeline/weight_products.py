"""Batched W's fast path: a weight's gradient over several microbatches as one product.

A linear layer's branch node (``addmm(b, x, W)`` or ``mm(x, W)``, with ``W``
often a transposed view of the weight) passes ``dW = x^T g`` and ``db = sum
of g's rows`` to its weight and bias, where ``x`` is the input it saved and
``g`` the gradient ``B`` kept for it. Both are sums over rows, so the weight
gradients of microbatches ``1..n`` are one product over their concatenated
rows: ``[x_1; ..; x_n]^T [g_1; ..; g_n]``, one large product in place of
``n`` small ones and one accumulation into ``.grad`` in place of ``n``.

:func:`product_of` recognises such a node when ``B`` ends (the saved input
on the path to the stage's inputs, the weight and bias reached through
nodes that depend on the weights alone: transposes, views, dtype casts), and
:func:`gradients` computes the batched gradients for the edges to feed.
Anything else (layer norms, embeddings, ties inside a stage) runs through
autograd as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["ACCUMULATE", "WEIGHT_SIDE", "Product", "product_of", "gradients", "weight_side"]

#: nodes on a weight's side of a product that are linear in the gradient and built from the weights
#: alone, so they are the same function in every microbatch's graph
WEIGHT_SIDE = frozenset({"TBackward0", "ViewBackward0", "UnsafeViewBackward0", "ToCopyBackward0",
                          "PermuteBackward0"})
ACCUMULATE = "torch::autograd::AccumulateGrad"


@dataclass(frozen=True)
class Product:
    """A branch node whose weight gradients are sums over rows, and the edges that take them."""

    node: Any
    weight: Optional[tuple[Any, int]]  # the edge of the right-hand factor, when it leads to a weight
    bias: Optional[tuple[Any, int]]  # addmm's bias edge, when it leads to a 1-d weight

    def rows(self) -> torch.Tensor:
        """The left-hand factor this microbatch saved (its rows are the microbatch's)."""
        n = self.node
        x: torch.Tensor = n._saved_mat1 if n.name() == "AddmmBackward0" else n._saved_self
        return x


def _end(edge: tuple[Any, int], params: set[int], shape_safe: bool) -> bool:
    """Whether ``edge`` reaches one of ``params`` through weight-side nodes only (``shape_safe``:
    dtype casts only, so the gradient's shape is the parameter's)."""
    node = edge[0]
    while node is not None and node.name() != ACCUMULATE:
        if node.name() not in (("ToCopyBackward0",) if shape_safe else WEIGHT_SIDE):
            return False
        nxt = [c for c, _ in node.next_functions if c is not None]
        if len(nxt) != 1:
            return False
        node = nxt[0]
    return node is not None and id(node.variable) in params and (not shape_safe or node.variable.dim() == 1)


def product_of(node: Any, on_path: set[Any], params: set[int]) -> Optional[Product]:
    """``node`` as a :class:`Product` if it is one (else None).

    Args:
        node: a branch node of :func:`~hvdhybrid.pipeline.split_backward.backward_input`.
        on_path: the nodes between the stage's inputs and its outputs.
        params: ids of the parameters of the node's group.
    """
    name = node.name()
    if name == "AddmmBackward0":
        if node._saved_alpha != 1 or node._saved_beta != 1:
            return None
        bias_e, rows_e, weight_e = node.next_functions
    elif name == "MmBackward0":
        bias_e = (None, 0)
        rows_e, weight_e = node.next_functions
    else:
        return None
    if rows_e[0] is not None and rows_e[0] not in on_path:
        return None  # the left factor leads to a weight (W @ x): not a sum over rows
    weight = weight_e if weight_e[0] is not None and weight_e[0] not in on_path else None
    bias = bias_e if bias_e[0] is not None and bias_e[0] not in on_path else None
    if weight is None and bias is None:
        return None
    if weight is not None and not _end(weight, params, False):
        return None
    if bias is not None and not _end(bias, params, True):
        return None
    return Product(node, weight, bias)


Edge = tuple[Any, int]


def gradients(products: list[Product], kept: list[torch.Tensor]) -> list[tuple[Edge, torch.Tensor]]:
    """The batched gradients of one layer over microbatches: (edge of the first microbatch, gradient)
    pairs to run the weight side from, for ``products`` (one per microbatch, in order) and the
    gradients ``kept`` at their outputs."""
    g = torch.cat([k.reshape(-1, k.shape[-1]) for k in kept]) if len(kept) > 1 else kept[0]
    first, out = products[0], []
    if first.weight is not None:
        rows = [p.rows() for p in products]
        x = torch.cat(rows) if len(rows) > 1 else rows[0]
        # in the layout of the right factor (a weight's transpose, for nn.Linear): accumulating a
        # transposed product into .grad is a strided add that costs as much as the product
        strides = first.node._saved_mat2_sym_strides
        column_major = strides[0] == 1 and strides[1] != 1
        out.append((first.weight, g.t().mm(x).t() if column_major else x.t().mm(g)))
    if first.bias is not None:
        out.append((first.bias, g.sum(0)))
    return out


def weight_side(nodes: set[Any], params: set[int]) -> set[Any]:
    """Those of ``nodes`` that compute from the weights alone: the gradient accumulators of ``params``
    (ids), and :data:`WEIGHT_SIDE` nodes whose inputs all are such (children before parents, without
    recursion: a deep stage's graph has thousands of nodes)."""
    out: set[Any] = set()
    state: dict[Any, bool] = {}
    for start in nodes:
        stack = [(start, False)]
        while stack:
            n, finish = stack.pop()
            if finish:
                kids = [c for c, _ in n.next_functions if c is not None]
                if n.name() == ACCUMULATE:
                    ok = id(n.variable) in params
                else:
                    ok = n.name() in WEIGHT_SIDE and bool(kids) and all(c in out for c in kids)
                if ok:
                    out.add(n)
                continue
            if n in state:
                continue
            state[n] = True
            stack.append((n, True))
            stack.extend((c, False) for c, _ in n.next_functions if c is not None and c not in state)
    return out
