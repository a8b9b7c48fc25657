"""A stage's backward split in two: input gradients now (``B``), weight gradients later (``W``).

``B`` runs the backward from the stage's outputs to its inputs only. On its way
it passes every node where a weight's gradient branches off the path to the
inputs (the node of ``x @ W.T`` computes both ``dx`` and ``dW``): these
*branch nodes* are found by walking the autograd graph before the backward, a
pre-hook on each keeps the gradient that reaches it, and :class:`WeightJob`
holds them. ``W`` then starts a backward at each branch node with the kept
gradient and stops at the weights: the chain of activation gradients between
the layers is not computed again (which a second backward from the outputs
would do, making ``B`` + ``W`` cost about two backwards).

Weights whose branch nodes overlap form one group, run by one backward; inside
a group, a branch node that another one's backward also reaches takes its kept
gradient, not the sum (the pre-hook replaces what arrives). A weight used at
both ends of one stage (a tie inside it) has branch nodes with the chain between
them: its group's backward runs that chain again (correct, not faster). A root the inputs' path does not pass
(token slices' keys and values, kept for the later slices' gradients) is a
branch node with its given gradient. A stage with no input that needs a
gradient (the first stage's data) takes as its path every node that is not on
a weight's side (:func:`~hvdhybrid.pipeline.weight_products.weight_side`); ``B``
runs it down to its *bottoms* (the first layer, e.g. the product of the data
with the first weight, or an embedding lookup), keeping the gradient that
reaches each, and ``W`` runs them. With token slices ``W`` runs the whole
backward (``whole``: the weights reached through the slices' key/value caches
are not split yet; a measured mismatch of 3e-4 against one process with zb1
and 3 slices is why).

Batched ``W`` (:func:`backward_weight` with several jobs): one backward per
group over all of them, and one product per linear layer
(:mod:`.weight_products`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch.autograd.graph import GradientEdge

from .weight_products import Product, gradients, product_of, weight_side

__all__ = ["WeightJob", "backward_input", "backward_weight"]


def _node(t: torch.Tensor) -> Optional[Any]:
    """The autograd node of ``t``: its grad_fn, or for a leaf its gradient accumulator."""
    if t.grad_fn is not None:
        return t.grad_fn
    view = t.view_as(t).grad_fn if t.requires_grad else None
    return view.next_functions[0][0] if view is not None else None


class WeightJob:
    """What ``B`` leaves for ``W``: per group, its weights and (branch node, kept gradients) pairs;
    or, when nothing branches, the roots to run the whole backward from."""

    def __init__(self, roots: list[torch.Tensor], grads: list[Optional[torch.Tensor]]) -> None:
        self.roots, self.grads = roots, grads
        self.groups: list[tuple[list[torch.Tensor], list[Any]]] = []
        self.kept: dict[Any, dict[int, torch.Tensor]] = {}  # branch node -> output index -> gradient
        self.products: list[Optional[Product]] = []  # per group: its one node, when it is a linear layer's
        self.whole = True


def backward_input(roots: list[torch.Tensor], grads: list[Optional[torch.Tensor]],
                   leaves: list[torch.Tensor], params: Sequence[torch.Tensor],
                   whole: bool = False) -> WeightJob:
    """Gradients into ``leaves`` (accumulated into their ``.grad``); the weight part kept for
    :func:`backward_weight`. The graph is retained for it. ``whole``: ``W`` will run the whole
    backward again (token slices: their key/value caches are not split yet)."""
    job = WeightJob(roots, grads)
    if whole:
        return _all_whole(job, roots, grads, leaves) if leaves else job
    parents: dict[Any, list[Any]] = {}
    seen: set[Any] = set()
    stack = [n for n in (_node(r) for r in roots) if n is not None]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for child, _ in n.next_functions:
            if child is not None:
                parents.setdefault(child, []).append(n)
                stack.append(child)
    on_path: set[Any] = set()  # nodes between the leaves and the roots: what B runs
    bottoms: list[Any] = []  # without leaves: where B stops (the path's ends; each a branch node)
    if leaves:
        stack = [n for n in (_node(t) for t in leaves) if n is not None]
        while stack:
            n = stack.pop()
            if n not in on_path:
                on_path.add(n)
                stack.extend(parents.get(n, []))
    else:  # no input needs a gradient (the first stage's data): the path is what is not the weights'
        side = weight_side(seen, {id(p) for p in params})
        on_path = seen - side
        bottoms = [n for n in on_path if all(c is None or c in side for c, _ in n.next_functions)]
        if not bottoms:
            return job
    # a root the inputs' path does not pass (this slice's keys and values, kept for later slices) is a
    # branch node too, with the gradient given for it: B does not run it
    root_nodes: dict[Any, dict[int, torch.Tensor]] = {}
    for r, g in zip(roots, grads):
        n = _node(r)
        if n is not None and n not in on_path:
            got = root_nodes.setdefault(n, {})
            g = torch.ones_like(r) if g is None else g
            got[r.output_nr] = got[r.output_nr] + g if r.output_nr in got else g
    branch_of: dict[Any, set[Any]] = {}  # weight -> its branch nodes
    nodes = {id(p): _node(p) for p in params}
    for p in params:
        start = nodes[id(p)]
        if start is None or start not in parents:
            continue
        found: set[Any] = set()
        stack, walked = list(parents[start]), set()
        while stack:
            n = stack.pop()
            if n in walked:
                continue
            walked.add(n)
            if n in on_path or n in root_nodes:
                found.add(n)
            else:
                stack.extend(parents.get(n, []))
        if not found:  # this weight never meets the inputs' path: W runs the whole backward
            return _all_whole(job, roots, grads, leaves)
        branch_of[id(p)] = found
    # weights sharing a branch node form one group (union by node)
    groups: list[tuple[list[torch.Tensor], set[Any]]] = []
    for p in params:
        mine = branch_of.get(id(p))
        if mine is None:
            continue
        ps, ns = [p], set(mine)
        while True:  # until no other group touches the merged one
            touch = [g for g in groups if g[1] & ns]
            if not touch:
                break
            for other_ps, other_ns in touch:
                ps += other_ps
                ns |= other_ns
            groups = [g for g in groups if not g[1] & ns]
        groups.append((ps, ns))
    job.kept.update(root_nodes)
    handles = []
    for _, ns in groups:
        for n in ns:
            if n not in root_nodes:
                handles.append(n.register_prehook(_keeper(job.kept, n)))
    try:
        if leaves:
            torch.autograd.backward(roots, grads, inputs=leaves, retain_graph=True)
        else:  # down to the bottoms, not through them: they run in W (the gradient reaching each is kept)
            at = torch.autograd.grad(roots, [GradientEdge(n, 0) for n in bottoms], grads, retain_graph=True,
                                     allow_unused=True)
            job.kept.update({n: {0: g} for n, g in zip(bottoms, at) if g is not None})
    finally:
        for h in handles:
            h.remove()
    job.whole = False
    job.groups = [(ps, list(ns)) for ps, ns in groups]
    job.products = [product_of(next(iter(ns)), on_path, {id(p) for p in ps})
                    if len(ns) == 1 and next(iter(ns)) not in root_nodes else None for ps, ns in groups]
    return job


def _keeper(kept: dict[Any, dict[int, torch.Tensor]], node: Any) -> Any:
    def hook(grad_outputs: tuple[Optional[torch.Tensor], ...]) -> None:
        kept[node] = {i: g for i, g in enumerate(grad_outputs) if g is not None}
    return hook


def _clamp(kept: dict[int, torch.Tensor]) -> Any:
    def hook(grad_outputs: tuple[Optional[torch.Tensor], ...]) -> tuple[Optional[torch.Tensor], ...]:
        return tuple(kept.get(i, g) for i, g in enumerate(grad_outputs))
    return hook


def _all_whole(job: WeightJob, roots: list[torch.Tensor], grads: list[Optional[torch.Tensor]],
               leaves: list[torch.Tensor]) -> WeightJob:
    torch.autograd.backward(roots, grads, inputs=leaves, retain_graph=True)
    return job


def backward_weight(jobs: Sequence[WeightJob], params: Sequence[torch.Tensor]) -> None:
    """The weight gradients :func:`backward_input` left for one or several microbatches of a stage,
    accumulated into ``params``' ``.grad``: one backward per group over all of them, so each weight
    accumulates once; with several, a linear layer's group is one product over their rows
    (:mod:`.weight_products`)."""
    jobs = [j for j in jobs if j.roots]
    if not jobs or not params:
        return
    shape = [[id(p) for p in ps] for ps, _ in jobs[0].groups]
    if any(j.whole or [[id(p) for p in ps] for ps, _ in j.groups] != shape for j in jobs):
        roots = [r for j in jobs for r in j.roots]
        grads = [g for j in jobs for g in j.grads]
        torch.autograd.backward(roots, grads, inputs=list(params))
        return
    alone = {k for k in range(len(shape)) if all(len(j.groups[k][1]) == 1 for j in jobs)}
    with _one_recomputation():  # groups of one branch node: each backward runs its own nodes only
        _groups(jobs, sorted(alone))
    _groups(jobs, [k for k in range(len(shape)) if k not in alone])  # a chain between branch nodes
    for j in jobs:
        j.kept.clear()
        j.groups, j.products = [], []


def _one_recomputation() -> Any:
    """W's backwards (one per group of weights) under one recomputation of each checkpointed region
    (``--recompute``): each backward is its own graph task, and torch's checkpoint would otherwise
    recompute a region once per task that reaches it: a GPT-2 block's six groups, six times. Only for
    groups of one branch node: their backwards run over disjoint nodes, which is what torch's
    ``GraphExecGroup`` asks; a group whose backward runs the chain between its branch nodes (a tie inside
    the stage) passes nodes other groups run too, and keeps a task (and a recomputation) of its own."""
    import contextlib

    from torch.utils import checkpoint

    group = getattr(checkpoint, "GraphExecGroup", None)
    return group() if group is not None else contextlib.nullcontext()


def _groups(jobs: Sequence[WeightJob], which: Sequence[int]) -> None:
    """Groups ``which`` of ``jobs``' weights: one backward each (one product, batched)."""
    for k in which:
        ps = jobs[0].groups[k][0]
        products = [j.products[k] for j in jobs]
        if len(jobs) > 1 and all(p is not None for p in products):
            got = gradients(products, [j.kept[p.node][0] for j, p in zip(jobs, products)])  # type: ignore
            edges = [GradientEdge(*e) for e, _ in got]
            torch.autograd.backward(edges, [g for _, g in got], inputs=ps, retain_graph=True)
            continue
        edges, grads, handles = [], [], []
        for j in jobs:
            ns = j.groups[k][1]
            for n in ns:
                for i, g in j.kept.get(n, {}).items():
                    edges.append(GradientEdge(n, i))
                    grads.append(g)
            if len(ns) > 1:
                handles += [n.register_prehook(_clamp(j.kept[n])) for n in ns if n in j.kept]
        if not edges:
            continue
        try:
            torch.autograd.backward(edges, grads, inputs=ps, retain_graph=True)
        finally:
            for h in handles:
                h.remove()
