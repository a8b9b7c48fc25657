"""GROVER featurisation: feature layout, batching invariants, labels, SMILES files and splits."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import rdkit
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rdkit import Chem
from rdkit.Chem.Scaffolds import MurckoScaffold

from hvdhybrid.models.grover.features import (
    ATOM_FDIM,
    BOND_FDIM,
    BOND_INPUT_FDIM,
    N_DESCRIPTORS,
    DescriptorScaler,
    GraphBatch,
    MolGraph,
    Vocab,
    atom_context,
    atom_features,
    batch_graphs,
    bond_context,
    bond_features,
    motif_labels,
    rdkit_2d,
)
from hvdhybrid.models.grover.molfiles import (
    chembl2321810,
    default_pretrain_smiles,
    random_split,
    read_smiles_csv,
    scaffold_split,
)
from hvdhybrid.training.data import DataError

# Offsets of the blocks in the 151 atom features, written out independently of the module.
Z, DEGREE, CHARGE, CHIRAL, HS, HYBRID, AROM, MASS, IMPVAL, DONOR, ACCEPTOR, ACIDIC, BASIC, RING = (
    0, 101, 108, 114, 119, 125, 131, 132, 133, 141, 142, 143, 144, 145)
RDKIT_DIR = os.path.dirname(rdkit.__file__)


def mol(smiles: str) -> Chem.Mol:
    m = Chem.MolFromSmiles(smiles)
    assert m is not None
    return m


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_dimensions() -> None:
    assert (ATOM_FDIM, BOND_FDIM, BOND_INPUT_FDIM) == (151, 14, 165)
    m = mol("C/C=C/c1ccccc1[C@H](N)O")
    for a in m.GetAtoms():
        assert len(atom_features(a)) == 151
    for b in m.GetBonds():
        assert len(bond_features(b)) == 14
    assert bond_features(None) == [1.0] + [0.0] * 13
    g = MolGraph(m)
    assert all(len(row) == 165 for row in g.f_bonds)


def test_pyridine_nitrogen() -> None:
    m = mol("c1ccncc1")
    f = atom_features(m.GetAtomWithIdx(3))
    ones = {i for i, x in enumerate(f) if x == 1.0}
    expected = {Z + 6, DEGREE + 2, CHARGE + 4, CHIRAL + 0, HS + 0, HYBRID + 1, AROM, IMPVAL + 0,
                ACCEPTOR, RING + 3}
    assert ones == expected
    assert f[MASS] == pytest.approx(0.14007, abs=1e-4)
    carbon = atom_features(m.GetAtomWithIdx(0))
    assert carbon[Z + 5] == 1.0 and carbon[HS + 1] == 1.0 and carbon[ACCEPTOR] == 0.0


def test_acid_amine_and_other_slots() -> None:
    acid = mol("CC(=O)O")
    oh, carbonyl = atom_features(acid.GetAtomWithIdx(3)), atom_features(acid.GetAtomWithIdx(2))
    assert oh[ACIDIC] == 1.0 and oh[DONOR] == 1.0 and oh[HS + 1] == 1.0
    assert oh[HYBRID + 1] == 1.0  # RDKit calls the conjugated OH oxygen SP2
    assert carbonyl[ACIDIC] == 0.0 and carbonyl[ACCEPTOR] == 1.0 and carbonyl[DONOR] == 0.0
    amine = atom_features(mol("CCN").GetAtomWithIdx(2))
    assert amine[BASIC] == 1.0 and amine[DONOR] == 1.0 and amine[ACIDIC] == 0.0
    assert atom_features(mol("CC(=O)N").GetAtomWithIdx(3))[BASIC] == 0.0  # an amide is not basic
    charged = atom_features(mol("C[N+](C)(C)C").GetAtomWithIdx(1))
    assert charged[CHARGE + 2] == 1.0 and charged[DEGREE + 4] == 1.0
    assert atom_features(mol("[Fe+3]").GetAtomWithIdx(0))[CHARGE + 5] == 1.0  # charge 3: 'other'
    assert atom_features(mol("*C").GetAtomWithIdx(0))[Z + 100] == 1.0  # dummy atom: 'other'
    assert atom_features(mol("C1CC1").GetAtomWithIdx(0))[RING + 0] == 1.0
    big = atom_features(mol("C1CCCCCCC1").GetAtomWithIdx(0))
    assert big[RING + 5] == 1.0 and sum(big[RING:RING + 6]) == 1.0


def test_bond_features() -> None:
    m = mol("C/C=C/c1ccccc1C#N")
    double = m.GetBondBetweenAtoms(1, 2)
    f = bond_features(double)
    assert f[0] == 0.0 and f[1:5] == [0.0, 1.0, 0.0, 0.0] and f[5] == 1.0 and f[6] == 0.0
    assert f[7 + int(Chem.BondStereo.STEREOE)] == 1.0 and sum(f[7:]) == 1.0
    ring = bond_features(m.GetBondBetweenAtoms(3, 4))
    assert ring[4] == 1.0 and ring[6] == 1.0 and ring[7] == 1.0  # aromatic, in ring, STEREONONE
    assert bond_features(m.GetBondBetweenAtoms(9, 10))[3] == 1.0


def test_batch_ethanol_benzene_sodium() -> None:
    graphs = [MolGraph(mol(s)) for s in ("CCO", "c1ccccc1", "[Na]")]
    g = batch_graphs(graphs)
    assert g.n_mols == 3
    assert g.f_atoms.shape == (11, 151) and g.f_atoms.dtype == torch.float32
    assert g.f_bonds.shape == (17, 165) and g.f_bonds.dtype == torch.float32
    assert g.a2b.shape == (11, 2) and g.a2a.shape == (11, 2) and g.a2b.dtype == torch.long
    assert g.b2a.shape == (17,) and g.b2revb.shape == (17,)
    assert g.a_scope.tolist() == [[1, 3], [4, 6], [10, 1]]
    assert g.b_scope.tolist() == [[1, 4], [5, 12], [17, 0]]
    assert not g.f_atoms[0].any() and not g.f_bonds[0].any()
    assert int(g.b2a[0]) == 0 and int(g.b2revb[0]) == 0 and not g.a2b[0].any()
    assert not g.a2b[10].any() and g.f_atoms[10].any()  # the sodium: no bonds, real features
    for i in range(1, 17):
        assert int(g.b2revb[g.b2revb[i]]) == i and int(g.b2revb[i]) != i
        assert torch.equal(g.f_bonds[i, :151], g.f_atoms[g.b2a[i]])
    incoming = {b: a for a in range(1, 11) for b in g.a2b[a].tolist() if b}
    assert sorted(incoming) == list(range(1, 17))  # every directed bond enters exactly one atom
    for b, a in incoming.items():
        assert int(g.b2a[g.b2revb[b]]) == a
    assert torch.equal(g.a2a, g.b2a[g.a2b])
    assert sorted(g.a2a[2].tolist()) == [1, 3]  # ethanol's middle carbon: both neighbours
    # every atom's molecule holds its bonds: scopes do not mix molecules
    for (a0, an), (b0, bn) in zip(g.a_scope.tolist(), g.b_scope.tolist()):
        src = g.b2a[b0:b0 + bn]
        assert bool(((src >= a0) & (src < a0 + an)).all())
    moved = g.to("cpu")
    assert isinstance(moved, GraphBatch) and torch.equal(moved.a2a, g.a2a)


def test_batch_single_atom_alone() -> None:
    g = batch_graphs([MolGraph(mol("[Na+]"))])
    assert g.f_atoms.shape == (2, 151) and g.f_bonds.shape == (1, 165)
    assert g.a2b.shape == (2, 1) and g.b_scope.tolist() == [[1, 0]]


def test_atom_features_flags_shortcut_agrees() -> None:
    m = mol("OC(=O)c1ccncc1CN")
    g = MolGraph(m)
    assert g.f_atoms == [atom_features(a) for a in m.GetAtoms()]


def test_contexts_by_hand() -> None:
    m = mol("CC(=O)O")
    assert [atom_context(a) for a in m.GetAtoms()] == [
        "C_C-SINGLE1", "C_C-SINGLE1_O-DOUBLE1_O-SINGLE1", "O_C-DOUBLE1", "O_C-SINGLE1"]
    assert atom_context(mol("CC(C)O").GetAtomWithIdx(1)) == "C_C-SINGLE2_O-SINGLE1"
    assert atom_context(mol("[Na]").GetAtomWithIdx(0)) == "Na"
    double = m.GetBondBetweenAtoms(1, 2)
    assert bond_context(double) == "C_C-SINGLE1_O-DOUBLE1_O-SINGLE1|DOUBLE|O_C-DOUBLE1"
    # the same bond written the other way round has the same context
    flipped = mol("O=C(O)C").GetBondBetweenAtoms(0, 1)
    assert bond_context(flipped) == bond_context(double)
    assert bond_context(m.GetBondBetweenAtoms(1, 3)) != bond_context(double)


def test_vocab() -> None:
    v = Vocab(["a", "b", "a", "c", "a", "b"], min_count=2)
    assert len(v) == 4 and v.itos == ["<pad>", "<other>", "a", "b"]
    assert v.index("a") == 2 and v.index("b") == 3
    assert v.index("c") == 1 and v.index("never seen") == 1  # rare and unseen -> <other>
    w = Vocab.from_json(v.to_json())
    assert w.itos == v.itos and w.index("b") == 3 and w.min_count == 2
    assert len(Vocab([], min_count=1)) == 2


def test_motif_labels() -> None:
    from rdkit.Chem import Fragments

    names = sorted(n for n in dir(Fragments) if n.startswith("fr_"))
    acid = motif_labels(mol("CC(=O)O"))
    assert len(acid) == 85 and set(acid) <= {0.0, 1.0}
    assert acid[names.index("fr_COO")] == 1.0 and acid[names.index("fr_Al_COO")] == 1.0
    assert acid[names.index("fr_benzene")] == 0.0
    two_rings = motif_labels(mol("c1ccccc1-c1ccccc1"))  # count 2 binarised to 1
    assert two_rings[names.index("fr_benzene")] == 1.0 and two_rings[names.index("fr_COO")] == 0.0


def test_shipped_files() -> None:
    wehi = read_smiles_csv(os.path.join(RDKIT_DIR, "Data", "Pains", "test_data", "wehi_mols.csv"))
    assert len(wehi) == 10000 and wehi.smiles[0] == "N(NC(=O)C1CCC1)c2ccc(cc2)C(C)(C)C"
    assert wehi.labels is None and len(wehi.mols) == 10000
    nci = read_smiles_csv(os.path.join(RDKIT_DIR, "Data", "NCI", "first_5K.smi"))
    assert nci.smiles[0] == "CC1=CC(=O)C=CC1=O"  # no header: the first line is a molecule
    assert len(nci) + len(nci.skipped) == 4999 and len(nci) > 4900
    assert all(isinstance(m, Chem.Mol) for m in nci.mols[:10])
    ch = chembl2321810()
    assert 950 <= len(ch) <= 1100 and ch.labels is not None
    assert ch.labels.shape == (len(ch), 1) and ch.labels.dtype == np.float32
    assert np.isfinite(ch.labels).all() and 3.0 < float(ch.labels.mean()) < 11.0
    assert ch.smiles[0].startswith("O=S(=O)(Nc1cccs1)") and float(ch.labels[0, 0]) == pytest.approx(5.48)


@pytest.fixture(scope="module")
def pretrain() -> list[str]:
    return default_pretrain_smiles()


def test_default_pretrain_smiles(pretrain: list[str]) -> None:
    s = pretrain
    assert len(s) > 14900 and s[0] == "N(NC(=O)C1CCC1)c2ccc(cc2)C(C)(C)C"


def test_bad_smiles_reported_by_line(tmp_path: Path) -> None:
    p = write(tmp_path, "d.csv", "smiles,y\nCCO,1\nC1CC,2\n\nc1ccccc1,3.5\nC1CC,4\nCN,\n")
    t = read_smiles_csv(p, label_cols=["y"])
    assert t.skipped == [3, 6] and t.smiles == ["CCO", "c1ccccc1", "CN"]
    assert t.report() == "skipped 2 unparsable SMILES (lines 3, 6)"
    assert t.labels is not None and t.labels.shape == (3, 1)
    assert t.labels[:2, 0].tolist() == [1.0, 3.5] and math.isnan(float(t.labels[2, 0]))


def test_smi_whitespace_with_columns(tmp_path: Path) -> None:
    p = write(tmp_path, "d.smi", "CCO a 1.0\nC1CC b 2\nc1ccccc1\tc -3\n")
    t = read_smiles_csv(p, label_cols=[2])
    assert t.smiles == ["CCO", "c1ccccc1"] and t.skipped == [2]
    assert t.labels is not None and t.labels[:, 0].tolist() == [1.0, -3.0]


def test_named_columns_and_missing_column(tmp_path: Path) -> None:
    p = write(tmp_path, "d.csv", "id,SMILES,y,z\n1,CCO,1,2\n2,CC,3,4\n")
    t = read_smiles_csv(p, label_cols=["z", "y"])
    assert t.smiles == ["CCO", "CC"] and t.label_names == ["z", "y"]
    assert t.labels is not None and t.labels.tolist() == [[2.0, 1.0], [4.0, 3.0]]
    with pytest.raises(DataError, match=r"no SMILES column 'smi'.*'id', 'SMILES', 'y', 'z'") as e:
        read_smiles_csv(p, smiles_col="smi")
    assert "d.csv" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"no label column 'act'.*'SMILES'"):
        read_smiles_csv(p, label_cols=["act"])


def test_non_numeric_label(tmp_path: Path) -> None:
    p = write(tmp_path, "d.csv", "smiles,y\nCCO,1\nCC,abc\n")
    with pytest.raises(DataError) as e:
        read_smiles_csv(p, label_cols=["y"])
    msg = str(e.value)
    assert msg.startswith(f"{p}:3:") and "column 2" in msg and "'y'" in msg and "'abc'" in msg
    assert isinstance(e.value, ValueError)


def test_empty_missing_and_unusable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        read_smiles_csv(write(tmp_path, "e.csv", ""))
    with pytest.raises(DataError, match="empty"):
        read_smiles_csv(write(tmp_path, "blank.smi", "\n  \n"))
    with pytest.raises(DataError, match="no data rows"):
        read_smiles_csv(write(tmp_path, "h.csv", "smiles,y\n"))
    with pytest.raises(DataError, match="none of its SMILES"):
        read_smiles_csv(write(tmp_path, "bad.csv", "smiles\nC1CC\nxyz\n"))
    with pytest.raises(DataError, match="no such file"):
        read_smiles_csv(str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match=r"short.csv:3: .*column 2"):
        read_smiles_csv(write(tmp_path, "short.csv", "name,smiles\na,CC\nb\n"))


def _scaffold(s: str) -> str:
    return str(MurckoScaffold.MurckoScaffoldSmiles(mol=mol(s), includeChirality=False))


def test_scaffold_split(pretrain: list[str]) -> None:
    smiles = pretrain[:600]
    tr, va, te = scaffold_split(smiles, (0.8, 0.1, 0.1), seed=0)
    assert sorted(tr + va + te) == list(range(600))
    assert len(tr) <= 480 and len(va) <= 60 and len(tr) >= 400 and len(va) >= 40
    scaffolds = [{_scaffold(smiles[i]) for i in part} for part in (tr, va, te)]
    assert not scaffolds[0] & scaffolds[1] and not scaffolds[0] & scaffolds[2]
    assert not scaffolds[1] & scaffolds[2]
    # the biggest scaffold set (benzene and friends) goes to train
    sizes: dict[str, int] = {}
    for s in smiles:
        sizes[_scaffold(s)] = sizes.get(_scaffold(s), 0) + 1
    assert max(sizes, key=lambda k: sizes[k]) in scaffolds[0]
    assert scaffold_split(smiles, seed=0) == (tr, va, te)
    assert scaffold_split(smiles, seed=1) != (tr, va, te)
    with pytest.raises(DataError, match="fractions"):
        scaffold_split(smiles, (0.5, 0.1, 0.1))
    with pytest.raises(DataError, match="cannot be parsed"):
        scaffold_split(["CC", "C1CC"])


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 300), seed=st.integers(0, 10**6),
       f=st.sampled_from([(0.8, 0.1, 0.1), (0.5, 0.25, 0.25), (1.0, 0.0, 0.0)]))
def test_random_split_partitions(n: int, seed: int, f: tuple[float, float, float]) -> None:
    tr, va, te = random_split(n, f, seed)
    assert sorted(tr + va + te) == list(range(n))
    assert len(tr) == int(f[0] * n) and len(va) == int(f[1] * n)
    assert random_split(list(range(n)), f, seed) == (tr, va, te)


def test_rdkit_2d_descriptors_by_hand() -> None:
    from rdkit.Chem import Descriptors

    names = [n for n, _ in Descriptors.descList]
    x = rdkit_2d([Chem.MolFromSmiles("CCO"), Chem.MolFromSmiles("c1ccccc1")])
    assert x.shape == (2, N_DESCRIPTORS) and N_DESCRIPTORS > 200
    assert x[0, names.index("NumHDonors")] == 1 and x[1, names.index("NumAromaticRings")] == 1
    assert x[0, names.index("MolWt")] == pytest.approx(46.069, abs=1e-2)
    assert x[1, names.index("fr_benzene")] == 1


def test_descriptor_scaler_is_the_training_cdf() -> None:
    train = np.array([[1.0, 5.0], [2.0, np.nan], [3.0, 5.0], [4.0, 5.0]])
    scale = DescriptorScaler(train)
    got = scale(np.array([[0.0, 4.0], [2.5, 5.0], [4.0, np.nan], [9.0, 6.0]]))
    # column 0: fraction of the 4 training values <= x; column 1: of the 3 known ones
    assert got.tolist() == [[0.0, 0.0], [0.5, 1.0], [1.0, 0.0], [1.0, 1.0]]
    assert got.dtype == np.float32
    assert scale(train)[:, 0].tolist() == [0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match=r"expected \[n, 2\]"):
        scale(np.zeros((2, 3)))
