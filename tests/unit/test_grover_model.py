"""GROVER's GTransformer block: exact attention (finite gradients where torch's CPU flash kernel
fails), equal to nn.MultiheadAttention, with dropout keyed by molecule."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from rdkit import Chem

from hvdhybrid.models.grover.config import CONFIGS
from hvdhybrid.models.grover.features import BOND_INPUT_FDIM, MolGraph, batch_graphs
from hvdhybrid.models.grover.model import MTBlock, pad_by_scope
from hvdhybrid.parallel import randomness

# Q, K, V (after the input projection, [1 molecule, 4 heads, 18 atoms, 32]) of node-view block 1
# at step 2001 of `hvdtrain grover pretrain --task-parallel` (config small, Adam 1e-3): attention
# logits of ~3e9. torch 2.13's CPU flash-attention backward gives NaN on them.
CASE = os.path.join(os.path.dirname(__file__), "data", "grover_attention_overflow.pt")
SMILES = ("CC(=O)Nc1ccc(O)cc1", "c1ccncc1CCO", "C")  # methane: no bonds (an empty edge-view molecule)


def test_the_blocks_attention_gives_a_finite_gradient_on_the_recorded_case() -> None:
    """The recorded Q/K/V through MTBlock's own attention (projections set to the identity)."""
    case = torch.load(CASE, weights_only=True)
    assert float((case["q"] @ case["k"].transpose(-1, -2)).abs().max()) > 1e9
    block = MTBlock(151, CONFIGS["small"], edge_view=False, key="node1")
    e = 128
    with torch.no_grad():
        block.attn.in_proj_weight.copy_(torch.eye(e).repeat(3, 1))
        block.attn.in_proj_bias.zero_()
    # [1, heads, n, d] -> [1, n, heads * d], the layout the projections produce
    q, k, v = (case[n].transpose(1, 2).reshape(1, 18, e).clone().requires_grad_() for n in "qkv")
    out = block._attend(q, k, v, torch.ones(1, 18, dtype=torch.bool), [18])
    out.sum().backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v) if t.grad is not None)


def graphs() -> tuple[MTBlock, object]:
    torch.manual_seed(0)
    block = MTBlock(151, CONFIGS["tiny"], edge_view=False, key="node0")
    return block, batch_graphs([MolGraph(Chem.MolFromSmiles(s)) for s in SMILES])


def test_the_attention_equals_nn_multiheadattention() -> None:
    block, g = graphs()
    h = torch.randn(g.f_atoms.shape[0], 32)  # type: ignore[attr-defined]
    q, mask, _ = pad_by_scope(h, g.a_scope)  # type: ignore[attr-defined]
    ours = block._attend(q, q, q, mask, g.a_scope[:, 1].tolist())  # type: ignore[attr-defined]
    ref, _ = block.attn(q, q, q, key_padding_mask=~mask, need_weights=False)
    assert float((ours - ref)[mask].detach().abs().max()) < 1e-6


def test_block_dropout_is_keyed_by_molecule_not_by_batch() -> None:
    """A molecule's output with dropout on is the same alone as in a batch with others."""
    cfg = CONFIGS["tiny"].__class__(**{**CONFIGS["tiny"].__dict__, "dropout": 0.3})
    torch.manual_seed(0)
    block = MTBlock(BOND_INPUT_FDIM, cfg, edge_view=True, key="edge0").train()
    mols = [MolGraph(Chem.MolFromSmiles(s)) for s in SMILES]
    randomness.set_step(0, 1)
    randomness.set_rows([7, 8, 9])
    both = batch_graphs(mols)
    out = block(both.f_bonds, both)
    randomness.set_rows([8])
    alone = batch_graphs(mols[1:2])
    one = block(alone.f_bonds, alone)
    start, size = both.b_scope[1].tolist()
    a0, n = alone.b_scope[0].tolist()
    assert torch.allclose(out[start:start + size], one[a0:a0 + n], atol=1e-6)
    randomness.set_rows([9])  # another row gets another mask
    assert not torch.allclose(block(alone.f_bonds, alone)[a0:a0 + n], one[a0:a0 + n])
    assert bool(torch.isfinite(out).all())  # methane has no bonds: still finite
    out.sum().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in block.parameters() if p.grad is not None)
    F.relu(out)  # the block's output is an ordinary tensor
