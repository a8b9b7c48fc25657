"""GROVER data sets for the trainer: molecules -> (GraphBatch, targets), layout-independent.

Pretraining masks some atoms and bonds of every molecule and predicts their
contextual properties; which ones is drawn by (seed, step, molecule index),
never by rank or microbatch. The masked atoms' features are removed from the
input *everywhere they appear*, including the source-atom half of every
directed bond leaving them (GROVER's reference code left them there, which
leaks the answer).

Losses weigh every molecule the same (mean over a molecule's masked atoms,
then over molecules), so any cut of a batch into microbatches and replicas
gives the same gradient as the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ...parallel import randomness
from .features import (
    ATOM_FDIM,
    GraphBatch,
    MolGraph,
    Vocab,
    atom_context,
    batch_graphs,
    bond_context,
    motif_labels,
)

__all__ = ["PretrainTargets", "FinetuneTargets", "PretrainSet", "FinetuneSet", "pretrain_loss",
           "finetune_loss", "build_vocabs", "masked_batch", "pretrain_item"]


@dataclass
class PretrainTargets:
    atom: torch.Tensor  # [n_atoms+1] vocab index (0 where not predicted)
    atom_w: torch.Tensor  # [n_atoms+1] weight: 1/(masked atoms of its molecule) where predicted
    bond: torch.Tensor  # [n_bonds+1]
    bond_w: torch.Tensor
    motif: torch.Tensor  # [n_mols, 85]
    motif_w: torch.Tensor  # [n_mols] 1, or 0 for a row whose SMILES did not parse (it stands in, unlearned)

    def to(self, device: torch.device) -> PretrainTargets:
        return PretrainTargets(*(t.to(device) for t in (self.atom, self.atom_w, self.bond, self.bond_w,
                                                         self.motif, self.motif_w)))


@dataclass
class FinetuneTargets:
    y: torch.Tensor  # [n_mols, tasks], NaN where missing, already normalised for regression

    def to(self, device: torch.device) -> FinetuneTargets:
        return FinetuneTargets(self.y.to(device))


def build_vocabs(mols: Sequence[Any], min_count: int = 1) -> tuple[Vocab, Vocab]:
    atoms = [atom_context(a) for m in mols for a in m.GetAtoms()]
    bonds = [bond_context(b) for m in mols for b in m.GetBonds()]
    return Vocab(atoms, min_count=min_count), Vocab(bonds, min_count=min_count)


Item = tuple[MolGraph, list[int], dict[tuple[int, int], int], torch.Tensor]


def pretrain_item(mol: Any, atom_vocab: Vocab, bond_vocab: Vocab) -> Item:
    """One molecule featurised for pretraining: its graph, atom and bond context labels, motifs."""
    return (MolGraph(mol), [atom_vocab.index(atom_context(a)) for a in mol.GetAtoms()],
            {(b.GetBeginAtomIdx(), b.GetEndAtomIdx()): bond_vocab.index(bond_context(b))
             for b in mol.GetBonds()},
            torch.tensor(motif_labels(mol), dtype=torch.float32))


def masked_batch(items: Sequence[Item], idx: Sequence[int], mask_rate: float,
                 dead: frozenset[int] = frozenset()) -> tuple[GraphBatch, PretrainTargets]:
    """Featurised molecules ``items`` (data-set indices ``idx``) as one masked batch and its targets.

    Which atoms and bonds are masked is drawn by (seed, step, molecule index): the draws of now.
    Rows ``dead`` (positions in ``items``) stand in for molecules that did not parse: they keep
    their row, so every layout's batches have the same rows, and weigh nothing in the loss.
    """
    g = batch_graphs([it[0] for it in items])
    na, nb = g.f_atoms.shape[0], g.f_bonds.shape[0]
    atom, atom_w = torch.zeros(na, dtype=torch.long), torch.zeros(na)
    bond, bond_w = torch.zeros(nb, dtype=torch.long), torch.zeros(nb)
    f_atoms, f_bonds = g.f_atoms.clone(), g.f_bonds.clone()
    for j, i in enumerate(idx):
        if j in dead:
            continue
        a0, an = (int(v) for v in g.a_scope[j])
        gen = randomness.generator("mask", i)
        k = max(1, int(round(mask_rate * an)))
        picked = torch.randperm(an, generator=gen)[:k] + a0
        atom[picked] = torch.tensor([items[j][1][p - a0] for p in picked.tolist()])
        atom_w[picked] = 1.0 / k
        f_atoms[picked] = 0.0
        b0, bn = (int(v) for v in g.b_scope[j])
        if bn:
            rows = torch.arange(b0, b0 + bn)
            f_bonds[rows[torch.isin(g.b2a[rows], picked)], :ATOM_FDIM] = 0.0  # no leak via bonds
            chosen = torch.randperm(bn, generator=gen)[:max(1, int(round(mask_rate * bn)))] + b0
            both = torch.unique(torch.cat([chosen, g.b2revb[chosen]]))
            for b in both.tolist():
                u, v = int(g.b2a[b]) - a0, int(g.b2a[g.b2revb[b]]) - a0
                labels = items[j][2]
                bond[b] = labels.get((u, v), labels.get((v, u), 1))
            bond_w[both] = 1.0 / both.numel()
            f_bonds[both, ATOM_FDIM:] = 0.0
    masked = GraphBatch(**{**vars(g), "f_atoms": f_atoms, "f_bonds": f_bonds})
    motifs = torch.stack([it[3] for it in items])
    motif_w = torch.tensor([0.0 if j in dead else 1.0 for j in range(len(items))])
    return masked, PretrainTargets(atom, atom_w, bond, bond_w, motifs, motif_w)


class PretrainSet:
    """Molecules with contextual-property and motif labels; masks drawn per step and molecule.

    A molecule is featurised the first time a batch needs it, then kept, so a
    large set costs nothing up front and each rank featurises only what it uses.
    (A corpus too large to keep: :class:`~hvdhybrid.models.grover.stream.StreamedPretrainSet`.)
    """

    def __init__(self, mols: Sequence[Any], atom_vocab: Vocab, bond_vocab: Vocab,
                 mask_rate: float = 0.15) -> None:
        self.mols = list(mols)
        self.atom_vocab, self.bond_vocab = atom_vocab, bond_vocab
        self.mask_rate = mask_rate
        self._items: dict[int, Item] = {}

    def __len__(self) -> int:
        return len(self.mols)

    def _item(self, i: int) -> Item:
        if i not in self._items:
            self._items[i] = pretrain_item(self.mols[i], self.atom_vocab, self.bond_vocab)
        return self._items[i]

    def batch(self, indices: Sequence[int]) -> tuple[GraphBatch, PretrainTargets]:
        idx = list(indices)
        return masked_batch([self._item(i) for i in idx], idx, self.mask_rate)


def pretrain_loss(out: tuple[torch.Tensor, ...], t: PretrainTargets) -> torch.Tensor:
    """Contextual properties (both views, atoms and bonds) + motifs; every molecule weighs the same.

    A row that stands in for an unparsable molecule weighs nothing but still counts in the mean,
    so the loss of a batch cut into any microbatches and replicas sums to the whole batch's.
    """
    atom_aa, atom_ab, bond_ba, bond_bb, motif_a, motif_b = out
    n = t.motif.shape[0]
    ce = nn.functional.cross_entropy
    loss = ((ce(atom_aa, t.atom, reduction="none") + ce(atom_ab, t.atom, reduction="none")) * t.atom_w).sum()
    loss = loss + ((ce(bond_ba, t.bond, reduction="none") + ce(bond_bb, t.bond, reduction="none"))
                   * t.bond_w).sum()
    bce = nn.functional.binary_cross_entropy_with_logits
    motif = (bce(motif_a, t.motif, reduction="none") + bce(motif_b, t.motif, reduction="none")).mean(1)
    return (loss + (motif * t.motif_w).sum()) / n


class FinetuneSet:
    """Molecules with labels (NaN: missing).

    Regression labels are standardised (with the training set's mean and std:
    pass them to the validation and test sets); ``standardize=False`` keeps
    them as they are (classification). Molecules are featurised on first use.
    ``features``: optional [n_mols, F] per-molecule features (already
    normalised), handed to the readout as ``GraphBatch.mol_features``.
    """

    def __init__(self, mols: Sequence[Any], labels: np.ndarray, mean: Optional[np.ndarray] = None,
                 std: Optional[np.ndarray] = None, standardize: bool = True,
                 features: Optional[np.ndarray] = None) -> None:
        self.mols = list(mols)
        if features is not None and len(features) != len(self.mols):
            raise ValueError(f"{len(features)} feature rows for {len(self.mols)} molecules")
        self.features = None if features is None else torch.tensor(np.asarray(features), dtype=torch.float32)
        y = np.asarray(labels, dtype=np.float64).reshape(len(self.mols), -1)
        tasks = y.shape[1]
        if standardize:
            self.mean = np.nanmean(y, 0) if mean is None else np.asarray(mean, dtype=np.float64)
            self.std = (np.nanstd(y, 0) + 1e-8) if std is None else np.asarray(std, dtype=np.float64)
        else:
            self.mean, self.std = np.zeros(tasks), np.ones(tasks)
        self.raw = y
        self.y = torch.tensor((y - self.mean) / self.std, dtype=torch.float32)
        self._graphs: dict[int, MolGraph] = {}

    def __len__(self) -> int:
        return len(self.mols)

    def _graph(self, i: int) -> MolGraph:
        if i not in self._graphs:
            self._graphs[i] = MolGraph(self.mols[i])
        return self._graphs[i]

    def batch(self, indices: Sequence[int]) -> tuple[GraphBatch, FinetuneTargets]:
        idx = list(indices)
        g = batch_graphs([self._graph(i) for i in idx])
        if self.features is not None:
            g.mol_features = self.features[idx]
        return g, FinetuneTargets(self.y[idx])


def _masked_mse(a: torch.Tensor, b: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    return (((a - b) ** 2) * ok).sum() / ok.numel()


def finetune_loss(out: tuple[torch.Tensor, ...], t: FinetuneTargets, classification: bool = False,
                  disagreement: float = 0.1) -> torch.Tensor:
    """Both heads against the labels, plus GROVER's disagreement term between the heads.

    Missing labels (NaN) count as zero loss; the mean is over molecules x tasks.
    """
    pa, pb = out
    ok = ~torch.isnan(t.y)
    y = torch.nan_to_num(t.y)
    if classification:
        bce = nn.functional.binary_cross_entropy_with_logits
        fit = ((bce(pa, y, reduction="none") + bce(pb, y, reduction="none")) * ok).sum() / ok.numel()
        return fit + disagreement * _masked_mse(torch.sigmoid(pa), torch.sigmoid(pb), ok)
    return _masked_mse(pa, y, ok) + _masked_mse(pb, y, ok) + disagreement * _masked_mse(pa, pb, ok)
