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
gradient (the first stage's data) has no path at all; then ``W`` runs the whole
backward, as it does with token slices (``whole``: the weights reached through
the slices' key/value caches are not split yet; a measured mismatch of 3e-4
against one process with zb1 and 3 slices is why).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch.autograd.graph import GradientEdge

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
        self.whole = True


def backward_input(roots: list[torch.Tensor], grads: list[Optional[torch.Tensor]],
                   leaves: list[torch.Tensor], params: Sequence[torch.Tensor],
                   whole: bool = False) -> WeightJob:
    """Gradients into ``leaves`` (accumulated into their ``.grad``); the weight part kept for
    :func:`backward_weight`. The graph is retained for it. ``whole``: ``W`` will run the whole
    backward again (token slices: their key/value caches are not split yet)."""
    job = WeightJob(roots, grads)
    if not leaves:
        return job
    if whole:
        return _all_whole(job, roots, grads, leaves)
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
    stack = [n for n in (_node(t) for t in leaves) if n is not None]
    while stack:
        n = stack.pop()
        if n not in on_path:
            on_path.add(n)
            stack.extend(parents.get(n, []))
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
        torch.autograd.backward(roots, grads, inputs=leaves, retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    job.whole = False
    job.groups = [(ps, list(ns)) for ps, ns in groups]
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


def backward_weight(job: WeightJob, params: Sequence[torch.Tensor]) -> None:
    """The weight gradients :func:`backward_input` left, accumulated into ``params``' ``.grad``."""
    if job.whole:
        if job.roots and params:
            torch.autograd.backward(job.roots, job.grads, inputs=list(params))
        return
    for ps, ns in job.groups:
        edges, grads = [], []
        for n in ns:
            for i, g in job.kept.get(n, {}).items():
                edges.append(GradientEdge(n, i))
                grads.append(g)
        if not edges:
            continue
        handles = [n.register_prehook(_clamp(job.kept[n])) for n in ns if n in job.kept] \
            if len(ns) > 1 else []
        try:
            torch.autograd.backward(edges, grads, inputs=ps, retain_graph=True)
        finally:
            for h in handles:
                h.remove()
    job.kept.clear()
    job.groups = []
