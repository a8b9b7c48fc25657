"""GROVER's GTransformer block: the attention's gradient stays finite where torch's CPU flash kernel fails."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from rdkit import Chem

from hvdhybrid.models.grover.config import CONFIGS
from hvdhybrid.models.grover.features import MolGraph, batch_graphs
from hvdhybrid.models.grover.model import MTBlock, exact_attention

# Q, K, V (after the input projection, [1 molecule, 4 heads, 18 atoms, 32]) of node-view block 1
# at step 2001 of `hvdtrain grover pretrain --task-parallel` (config small, Adam 1e-3): attention
# logits of ~3e9. torch 2.13's CPU flash-attention backward gives NaN on them.
CASE = os.path.join(os.path.dirname(__file__), "data", "grover_attention_overflow.pt")


def _grads_finite(case: dict[str, torch.Tensor]) -> bool:
    q, k, v = (case[n].clone().requires_grad_() for n in "qkv")
    F.scaled_dot_product_attention(q, k, v).sum().backward()
    return all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v) if t.grad is not None)


def test_exact_attention_gives_a_finite_gradient_on_the_recorded_case() -> None:
    case = torch.load(CASE, weights_only=True)
    logits = case["q"] @ case["k"].transpose(-1, -2)
    assert float(logits.abs().max()) > 1e9  # the recorded case is the large-logit one
    with exact_attention():
        assert _grads_finite(case)


def test_the_block_attends_under_exact_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """MTBlock's attention runs with only the math kernel enabled."""
    seen: list[bool] = []
    real = F.scaled_dot_product_attention

    def spy(*args: Any, **kw: Any) -> torch.Tensor:
        fused = torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
        seen.append(fused)
        return real(*args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    block = MTBlock(151, CONFIGS["tiny"], edge_view=False, key="node0")
    g = batch_graphs([MolGraph(Chem.MolFromSmiles(s)) for s in ("CC(=O)Nc1ccc(O)cc1", "c1ccncc1CCO")])
    block(g.f_atoms, g).sum().backward()
    assert seen == [False]
    assert torch.backends.cuda.flash_sdp_enabled()  # restored afterwards
