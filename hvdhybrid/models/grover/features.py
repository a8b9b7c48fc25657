"""Molecule featurisation and self-supervision labels for GROVER (files and splits: :mod:`.molfiles`).

Atoms get 151 features and directed bonds 165 (source atom's 151 + the bond's 14), as in
Rong et al. 2020. ``batch_graphs`` packs molecules into one graph whose row 0 of every
atom/bond table is zero padding. Labels for pre-training are the atom/bond contexts
(``atom_context``/``bond_context`` through a ``Vocab``) and 85 binary functional-group motifs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from rdkit import Chem
from rdkit.Chem import Descriptors, Fragments
from rdkit.rdBase import BlockLogs

__all__ = [
    "ATOM_FDIM", "BOND_FDIM", "BOND_INPUT_FDIM", "N_MOTIFS", "atom_features", "bond_features",
    "pharmacophore_flags", "MolGraph", "GraphBatch", "batch_graphs", "atom_context", "bond_context",
    "Vocab", "motif_labels", "N_DESCRIPTORS", "rdkit_2d", "DescriptorScaler",
]

ATOM_FDIM = 151
BOND_FDIM = 14
BOND_INPUT_FDIM = ATOM_FDIM + BOND_FDIM
_HYBRID = [Chem.HybridizationType.SP, Chem.HybridizationType.SP2, Chem.HybridizationType.SP3,
           Chem.HybridizationType.SP3D, Chem.HybridizationType.SP3D2]
_BOND_TYPES = [Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE, Chem.BondType.AROMATIC]
# Pharmacophore flags, in atom_features order: H-bond donor, H-bond acceptor, acidic, basic.
_PHARM_SMARTS = [
    "[$([N;!H0;v3,v4&+1]),$([O,S;H1;+0]),n&H1&+0]",
    "[$([O,S;H1;v2;!$(*-*=[O,N,P,S])]),$([O,S;H0;v2]),$([O,S;-]),$([N;v3;!$(N-*=[O,N,P,S])]),"
    "n&H0&+0,$([o,s;+0;!$([o,s]:n);!$([o,s]:c:n)])]",
    "[$([O;H1,-]-[C,S,P]=[O,S]),$([#7;H1,-;r5]1~[#7]~[#7]~[#7]~[#6]~1),$([#7;H1,-;r5]1~[#7]~[#7]~[#6]~[#7]~1)]",
    "[$([N;X3;+0;!$(N-[C,S,P]=[O,S,N]);!$(N-a);!$(N-[N,O]);!$(N-C=C)]),$([N;X4;+]),"
    "$([N;X2;+0]=C-N),$([n;X2;+0]:c:[nH])]",
]
_PHARM = [Chem.MolFromSmarts(s) for s in _PHARM_SMARTS]
_MOTIF_NAMES = sorted(n for n in dir(Fragments) if n.startswith("fr_"))
assert len(_MOTIF_NAMES) == 85, f"rdkit.Chem.Fragments has {len(_MOTIF_NAMES)} fr_ descriptors, not 85"
N_MOTIFS = len(_MOTIF_NAMES)


def _onehot(value: object, choices: Sequence[object]) -> list[float]:
    """One-hot of ``value`` over ``choices`` plus a final 'other' slot."""
    out = [0.0] * (len(choices) + 1)
    out[choices.index(value) if value in choices else len(choices)] = 1.0
    return out


def pharmacophore_flags(mol: Chem.Mol) -> list[list[float]]:
    """Per atom [donor, acceptor, acidic, basic], each SMARTS matched once for the whole molecule."""
    flags = [[0.0] * len(_PHARM) for _ in range(mol.GetNumAtoms())]
    for k, patt in enumerate(_PHARM):
        for match in mol.GetSubstructMatches(patt):
            flags[match[0]][k] = 1.0
    return flags


def atom_features(atom: Chem.Atom, flags: Optional[Sequence[float]] = None) -> list[float]:
    """The 151 features of one atom; ``flags`` from ``pharmacophore_flags`` saves re-matching SMARTS."""
    if flags is None:
        flags = pharmacophore_flags(atom.GetOwningMol())[atom.GetIdx()]
    f = (_onehot(atom.GetAtomicNum(), range(1, 101)) + _onehot(atom.GetDegree(), range(6))
         + _onehot(atom.GetFormalCharge(), [-1, -2, 1, 2, 0])
         + _onehot(int(atom.GetChiralTag()), range(4)) + _onehot(atom.GetTotalNumHs(), range(5))
         + _onehot(atom.GetHybridization(), _HYBRID) + [1.0 if atom.GetIsAromatic() else 0.0]
         + [atom.GetMass() * 0.01] + _onehot(atom.GetValence(Chem.ValenceType.IMPLICIT), range(7))
         + [float(x) for x in flags] + [1.0 if atom.IsInRingSize(n) else 0.0 for n in range(3, 9)])
    assert len(f) == ATOM_FDIM, len(f)
    return f


def bond_features(bond: Optional[Chem.Bond]) -> list[float]:
    """The 14 features of a bond: [is None], type (4), conjugated, in ring, stereo (6 + other)."""
    if bond is None:
        return [1.0] + [0.0] * (BOND_FDIM - 1)
    f = ([0.0] + [1.0 if bond.GetBondType() == t else 0.0 for t in _BOND_TYPES]
         + [float(bond.GetIsConjugated()), float(bond.IsInRing())] + _onehot(int(bond.GetStereo()), range(6)))
    assert len(f) == BOND_FDIM, len(f)
    return f


class MolGraph:
    """One molecule: atom feature rows and directed bonds (a->b and b->a per chemical bond), 0-based."""

    def __init__(self, mol: Chem.Mol) -> None:
        flags = pharmacophore_flags(mol)
        self.n_atoms: int = mol.GetNumAtoms()
        self.f_atoms: list[list[float]] = [atom_features(a, flags[a.GetIdx()]) for a in mol.GetAtoms()]
        self.f_bonds: list[list[float]] = []  # atom_features(source) + bond_features(bond)
        self.b2a: list[int] = []  # source atom of each directed bond
        self.b2t: list[int] = []  # target atom of each directed bond
        self.b2revb: list[int] = []
        self.a2b: list[list[int]] = [[] for _ in range(self.n_atoms)]  # incoming directed bonds
        for bond in mol.GetBonds():
            u, v = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
            fb = bond_features(bond)
            for src, dst in ((u, v), (v, u)):
                b = len(self.b2a)
                self.f_bonds.append(self.f_atoms[src] + fb)
                self.b2a.append(src)
                self.b2t.append(dst)
                self.a2b[dst].append(b)
                self.b2revb.append(b + 1 if src == u else b - 1)
        self.n_bonds: int = len(self.b2a)


@dataclass
class GraphBatch:
    """Many molecules as one graph; row 0 of atoms and bonds is zero padding, scopes start at 1."""

    f_atoms: torch.Tensor  # [n_atoms+1, ATOM_FDIM] float32
    f_bonds: torch.Tensor  # [n_bonds+1, BOND_INPUT_FDIM] float32
    a2b: torch.Tensor  # [n_atoms+1, max_in] long, incoming directed bonds, 0-padded
    b2a: torch.Tensor  # [n_bonds+1] long, source atom
    b2revb: torch.Tensor  # [n_bonds+1] long, reverse bond
    a2a: torch.Tensor  # [n_atoms+1, max_in] long, neighbour atoms (sources of a2b), 0-padded
    a_scope: torch.Tensor  # [n_mols, 2] long: (start, count)
    b_scope: torch.Tensor  # [n_mols, 2] long: (start, count)
    mol_features: Optional[torch.Tensor] = None  # [n_mols, F] float32: per-molecule extras (RDKit 2D)

    @property
    def n_mols(self) -> int:
        return int(self.a_scope.shape[0])

    def to(self, device: torch.device | str) -> GraphBatch:
        return dataclasses.replace(self, **{f: t.to(device) for f in self.__dataclass_fields__
                                            if (t := getattr(self, f)) is not None})


def batch_graphs(mols: Sequence[MolGraph]) -> GraphBatch:
    """Pack molecule graphs into one ``GraphBatch`` with atom and bond indices offset past the padding."""
    f_atoms, f_bonds = [[0.0] * ATOM_FDIM], [[0.0] * BOND_INPUT_FDIM]
    a2b: list[list[int]] = [[]]
    b2a, b2revb, a_scope, b_scope = [0], [0], [], []
    for g in mols:
        a0, b0 = len(f_atoms), len(f_bonds)
        f_atoms += g.f_atoms
        f_bonds += g.f_bonds
        a2b += [[b + b0 for b in bs] for bs in g.a2b]
        b2a += [a + a0 for a in g.b2a]
        b2revb += [b + b0 for b in g.b2revb]
        a_scope.append((a0, g.n_atoms))
        b_scope.append((b0, g.n_bonds))
    max_in = max(1, max(len(bs) for bs in a2b))
    a2b_t = torch.tensor([bs + [0] * (max_in - len(bs)) for bs in a2b], dtype=torch.long)
    b2a_t = torch.tensor(b2a, dtype=torch.long)
    return GraphBatch(
        f_atoms=torch.tensor(f_atoms, dtype=torch.float32),
        f_bonds=torch.tensor(f_bonds, dtype=torch.float32),
        a2b=a2b_t, b2a=b2a_t, b2revb=torch.tensor(b2revb, dtype=torch.long), a2a=b2a_t[a2b_t],
        a_scope=torch.tensor(a_scope, dtype=torch.long).view(-1, 2),
        b_scope=torch.tensor(b_scope, dtype=torch.long).view(-1, 2))


_DESCRIPTOR_NAMES = [name for name, _ in Descriptors.descList]
N_DESCRIPTORS = len(_DESCRIPTOR_NAMES)


def rdkit_2d(mols: Sequence[Chem.Mol]) -> np.ndarray:
    """RDKit's 2D descriptors (every one in ``Descriptors.descList``), [n_mols, N_DESCRIPTORS] float64.

    A descriptor RDKit cannot compute for a molecule, or an infinite one, is NaN.
    """
    out = np.full((len(mols), N_DESCRIPTORS), np.nan)
    with BlockLogs(), np.errstate(all="ignore"):
        for i, m in enumerate(mols):
            d = Descriptors.CalcMolDescriptors(m, missingVal=math.nan)
            out[i] = [d[n] for n in _DESCRIPTOR_NAMES]
    out[~np.isfinite(out)] = np.nan
    return out


class DescriptorScaler:
    """Normalises descriptors as GROVER's ``rdkit_2d_normalized`` does: each through a CDF, into [0, 1].

    GROVER's CDFs were fitted on ChEMBL (descriptastorus, not shipped here);
    this fits each descriptor's empirical CDF on the training molecules, so
    validation and test molecules are scaled by what training saw. NaN -> 0.
    """

    def __init__(self, train: np.ndarray) -> None:
        self.columns = [np.sort(col[~np.isnan(col)]) for col in np.asarray(train, np.float64).T]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.columns):
            raise ValueError(f"expected [n, {len(self.columns)}] descriptors, got {list(x.shape)}")
        out = np.zeros(x.shape, np.float32)
        for j, ref in enumerate(self.columns):
            if len(ref):
                out[:, j] = np.searchsorted(ref, x[:, j], side="right") / len(ref)
        out[np.isnan(x)] = 0.0
        return out


def atom_context(atom: Chem.Atom) -> str:
    """Symbol plus sorted (neighbour symbol, bond type) counts, e.g. 'C_C-SINGLE2_O-DOUBLE1'."""
    counts = Counter(f"{b.GetOtherAtom(atom).GetSymbol()}-{b.GetBondType().name}" for b in atom.GetBonds())
    return "_".join([atom.GetSymbol()] + [f"{k}{counts[k]}" for k in sorted(counts)])


def bond_context(bond: Chem.Bond) -> str:
    """The bond type between its two ends' atom contexts, smaller first: the same both ways round."""
    lo, hi = sorted((atom_context(bond.GetBeginAtom()), atom_context(bond.GetEndAtom())))
    return f"{lo}|{bond.GetBondType().name}|{hi}"


class Vocab:
    """Strings to indices: 0 '<pad>', 1 '<other>' (unseen or rarer than ``min_count``), then by count."""

    PAD, OTHER = "<pad>", "<other>"

    def __init__(self, items: Iterable[str] = (), min_count: int = 1) -> None:
        counts = Counter(items)
        kept = sorted((s for s, c in counts.items() if c >= min_count), key=lambda s: (-counts[s], s))
        self.min_count = min_count
        self.itos: list[str] = [self.PAD, self.OTHER] + [s for s in kept if s not in (self.PAD, self.OTHER)]
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(self.itos)}

    def index(self, s: str) -> int:
        return self.stoi.get(s, 1)

    def __len__(self) -> int:
        return len(self.itos)

    def to_json(self) -> str:
        return json.dumps({"min_count": self.min_count, "itos": self.itos})

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        d = json.loads(text)
        v = cls(min_count=int(d["min_count"]))
        v.itos = [str(s) for s in d["itos"]]
        v.stoi = {s: i for i, s in enumerate(v.itos)}
        return v


def motif_labels(mol: Chem.Mol) -> list[float]:
    """85 binary labels: is each RDKit ``fr_*`` functional group (sorted by name) present."""
    return [1.0 if getattr(Fragments, name)(mol) > 0 else 0.0 for name in _MOTIF_NAMES]
