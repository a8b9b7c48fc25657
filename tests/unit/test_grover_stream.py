"""GROVER's streamed corpus: the index, the shard-order shuffle, featurising workers, stand-in rows."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
import torch
from rdkit import Chem

from hvdhybrid.models.grover.config import CONFIGS
from hvdhybrid.models.grover.corpus import (
    SHARD,
    CorpusIndex,
    CorpusSource,
    held_out,
    index_corpus,
    resolve_corpus,
)
from hvdhybrid.models.grover.data import PretrainSet, pretrain_loss
from hvdhybrid.models.grover.features import Vocab
from hvdhybrid.models.grover.staged import GroverNet, PretrainHeads
from hvdhybrid.models.grover.stream import StreamedPretrainSet, StreamOrder, StreamSampler
from hvdhybrid.models.grover.workers import Workers, featurise_batch
from hvdhybrid.parallel import randomness
from hvdhybrid.training.data import DataError

SMILES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN(CC)CC", "c1ccncc1", "OC(=O)c1ccccc1", "CC(C)Cl", "C1CCCCC1",
          "CCOC(=O)C", "NCCO", "c1ccc2ccccc2c1", "CC#N", "O=C1CCCC1", "CS(=O)(=O)N", "FC(F)(F)c1ccccc1"]


# ---------------------------------------------------------------- the order
@pytest.mark.parametrize("n,window", [(5000, 2), (SHARD, 1), (7, 32), (3 * SHARD + 1, 2)])
def test_every_epoch_is_a_permutation_and_any_slice_reads_alone(n: int, window: int) -> None:
    order = StreamOrder(n, seed=3, window=window)
    whole = [order.ids(0, 0, n), order.ids(1, 0, n)]
    for ids in whole:
        assert sorted(ids) == list(range(n))
    if n > 10:
        assert whole[0] != whole[1]
    fresh = StreamOrder(n, seed=3, window=window)  # nothing read before: any position maps alone
    for lo, hi in [(0, 1), (n // 3, n // 2), (n - 5, n), (1, n)]:
        assert fresh.ids(1, lo, hi) == whole[1][lo:hi]
        assert fresh.ids(0, lo, hi) == whole[0][lo:hi]


def test_the_shuffle_mixes_shards() -> None:
    """A window of shards is shuffled together: a batch draws from several shards, not one run of lines."""
    ids = StreamOrder(8 * SHARD, seed=0, window=4).ids(0, 0, 64)
    assert len({i // SHARD for i in ids}) >= 3
    assert ids != sorted(ids)


def test_the_sampler_resumes_at_the_exact_molecule_and_holds_no_permutation() -> None:
    a = StreamSampler(3000, 64, seed=1)
    for _ in range(70):  # into the second epoch (46 batches of 64 per epoch)
        a.next()
    state = a.state()
    assert state["epoch"] == 1 and a._perm == []
    b = StreamSampler(3000, 64, seed=1)
    b.load_state(state)
    peeked = b.peek()
    assert b.next() == a.next() == peeked
    assert all(b.next() == a.next() for _ in range(30))
    held = len(a.order._win[1])
    assert held <= 32 * SHARD


def test_the_sampler_refuses_another_corpus_on_resume() -> None:
    state = StreamSampler(3000, 64, seed=1).state()
    with pytest.raises(DataError, match="resume with the same data"):
        StreamSampler(2999, 64, seed=1).load_state(state)


# ---------------------------------------------------------------- the corpus index
def write(path: Path, text: str) -> str:
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


def index_of(src: CorpusSource, tmp_path: Path, **kw: object) -> CorpusIndex:
    return CorpusIndex(index_corpus(src, Workers(0), cache=str(tmp_path / "cache"), **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("name,text,column", [
    ("m.csv", "id,smiles,y\n" + "".join(f"m{i},{s},1\n" for i, s in enumerate(SMILES)), None),
    ("m.csv.gz", "SMILES,x\n" + "".join(f"{s},2\n" for s in SMILES), "SMILES"),
    ("m.smi", "".join(f"{s} name{i}\n" for i, s in enumerate(SMILES)), None),
    ("m.txt", "".join(f"q,{s}\n" for s in SMILES), 1),
])
def test_index_reads_csv_gz_and_smi_files(tmp_path: Path, name: str, text: str, column: object) -> None:
    src = resolve_corpus(write(tmp_path / name, text), column)  # type: ignore[arg-type]
    index = index_of(src, tmp_path)
    assert index.n == len(SMILES)
    assert index.smiles(list(range(len(SMILES)))) == SMILES
    assert len(Vocab.from_json(index.vocabs[0])) > 2


def test_index_is_made_once_and_keyed_by_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "m.smi", "\n".join(SMILES * 200) + "\n")
    first = index_corpus(resolve_corpus(path), Workers(0), cache=str(tmp_path / "c"))
    stamp = os.stat(os.path.join(first, "clean.smi")).st_mtime_ns
    assert index_corpus(resolve_corpus(path), Workers(0), cache=str(tmp_path / "c")) == first
    assert os.stat(os.path.join(first, "clean.smi")).st_mtime_ns == stamp
    index = CorpusIndex(first)
    assert index.n == 3000 and len(index.offsets) == 4  # 3 shards: 1024, 1024, 952
    ids = [0, 1023, 1024, 2999, 5]
    assert index.smiles(ids) == [(SMILES * 200)[i] for i in ids]
    limited = CorpusIndex(index_corpus(resolve_corpus(path), Workers(0), cache=str(tmp_path / "c"),
                                       limit=100))
    assert limited.n == 100 and limited.dir != first
    assert held_out(limited, 5) == (SMILES * 200)[:5]
    assert len(held_out(limited, 80)) == 50  # at most half


def test_index_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file; pass moses, rdkit"):
        resolve_corpus(str(tmp_path / "none.csv"))
    with pytest.raises(DataError, match="the file is empty"):
        index_of(resolve_corpus(write(tmp_path / "e.csv", "\n")), tmp_path)
    with pytest.raises(DataError, match="none of its SMILES could be parsed"):
        index_of(resolve_corpus(write(tmp_path / "bad.smi", "C1CC(\nxyz\n")), tmp_path)
    with pytest.raises(DataError, match="no SMILES column 'smi'"):
        index_of(resolve_corpus(write(tmp_path / "h.csv", "smiles,y\nCCO,1\n"), "smi"), tmp_path)
    assert not [p for p in os.listdir(tmp_path / "cache") if p.startswith(".index-")]  # no half index left


def test_the_rdkit_corpus_is_the_shipped_molecules() -> None:
    src = resolve_corpus("rdkit")
    assert len(src.paths) == 2 and all(os.path.isfile(p) for p in src.paths)
    assert sum(1 for _ in src.records()) > 14000


# ---------------------------------------------------------------- featurising, stand-ins
def vocabs() -> tuple[Vocab, Vocab]:
    from hvdhybrid.models.grover.data import build_vocabs

    return build_vocabs([Chem.MolFromSmiles(s) for s in SMILES])


def test_streamed_batches_equal_the_in_memory_set() -> None:
    av, bv = vocabs()
    mem = PretrainSet([Chem.MolFromSmiles(s) for s in SMILES], av, bv)
    randomness.set_step(4, 9)
    ids = [3, 0, 7, 11]
    g1, t1 = mem.batch(ids)
    g2, t2 = featurise_batch(4, 9, ids, [SMILES[i] for i in ids], 0.15, (av, bv))
    for a, b in [(g1.f_atoms, g2.f_atoms), (g1.f_bonds, g2.f_bonds), (g1.a2b, g2.a2b), (t1.atom, t2.atom),
                 (t1.bond_w, t2.bond_w), (t1.motif, t2.motif)]:
        assert torch.equal(a, b)
    assert torch.equal(t2.motif_w, torch.ones(4))


def test_an_unparsable_row_stands_in_with_no_weight_and_keeps_batches_transparent() -> None:
    """Loss of the whole batch == the mean of its halves' losses, with a stand-in in one half; and the
    stand-in's own loss terms are zero whatever the model predicts."""
    av, bv = vocabs()
    smiles = ["CCO", "C1CC(", "c1ccccc1", "CC(=O)O"]
    whole = featurise_batch(0, 1, [0, 1, 2, 3], smiles, 0.5, (av, bv))
    assert torch.equal(whole[1].motif_w, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    a, b = (featurise_batch(0, 1, ids, [smiles[i] for i in ids], 0.5, (av, bv)) for ids in ([0, 1], [2, 3]))
    torch.manual_seed(0)
    cfg = CONFIGS["tiny"]
    net = GroverNet(cfg, PretrainHeads(cfg, len(av), len(bv), 85)).eval()
    alone = featurise_batch(0, 1, [1], ["C1CC("], 0.5, (av, bv))
    with torch.no_grad():
        full = pretrain_loss(net(whole[0]), whole[1])
        halves = (pretrain_loss(net(a[0]), a[1]) + pretrain_loss(net(b[0]), b[1])) / 2
        assert float(full) == pytest.approx(float(halves), rel=1e-5)
        assert float(pretrain_loss(net(alone[0]), alone[1])) == 0.0


def test_workers_prefetch_the_next_step_and_count_waits(tmp_path: Path) -> None:
    path = write(tmp_path / "m.smi", "\n".join(SMILES + ["C1CC("]) + "\n")
    index = index_of(resolve_corpus(path), tmp_path)
    inline = StreamedPretrainSet(index, index.n, 0.15, Workers(0, index.vocabs))
    pooled = StreamedPretrainSet(CorpusIndex(index.dir), index.n, 0.15, Workers(1, index.vocabs))
    try:
        randomness.set_step(0, 1)
        rows = [[1, 15, 2], [4, 5, 6]]
        pooled.batch([0])  # a rank that reads data: prefetch is on from now
        pooled.prefetch(0, 2, rows)
        assert len(pooled._pending) == 2
        randomness.set_step(0, 2)
        for r in rows:
            g1, t1 = inline.batch(r)
            g2, t2 = pooled.batch(r)
            assert torch.equal(g1.f_bonds, g2.f_bonds) and torch.equal(t1.atom, t2.atom)
        assert not pooled._pending and pooled.molecules == 7 and pooled.skipped == 1 == inline.skipped
        assert pooled.wait_s > 0
        inline.prefetch(0, 3, rows)  # no workers: nothing to do ahead
        assert not inline._pending
    finally:
        inline.close()
        pooled.close()


def test_workers_refuse_a_negative_count() -> None:
    with pytest.raises(DataError, match="--workers must be >= 0"):
        Workers(-1)


def test_workers_option_reads_a_count_or_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    from hvdhybrid.cli.grover_options import workers_for

    assert workers_for("3") == 3 and workers_for("0") == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "1")
    assert workers_for("auto") == 1  # a core to spare
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    assert workers_for("auto") == 0  # every core has a rank
    with pytest.raises(DataError, match="--workers 'x': give a number of processes or auto"):
        workers_for("x")
    with pytest.raises(DataError, match="--workers must be >= 0, got -2"):
        workers_for("-2")


def test_index_reads_a_bom_and_odd_separators_line_by_line(tmp_path: Path) -> None:
    """A UTF-8 BOM before the header is dropped; a form feed inside a cell does not split a record."""
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffSMILES,note\nCCO,a\x0cb\nc1ccccc1,x\x1cy\nCC(=O)O,z\n".encode())
    index = index_of(resolve_corpus(str(path), "SMILES"), tmp_path)
    assert index.n == 3 and index.smiles([0, 1, 2]) == ["CCO", "c1ccccc1", "CC(=O)O"]
    odd = tmp_path / "odd.csv"
    odd.write_bytes(b"smiles\nCCO\nC\x0cC\nc1ccccc1\n")  # a SMILES cell with a form feed: one record
    assert index_of(resolve_corpus(str(odd)), tmp_path).smiles([0, 1, 2]) == ["CCO", "C\x0cC", "c1ccccc1"]


def test_a_cache_that_cannot_be_written_or_read_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "m.smi", "CCO\n")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError, match="cannot write there"):
        index_corpus(resolve_corpus(path), Workers(0), cache=str(blocker / "cache"))
    with pytest.raises(DataError, match="no complete corpus index there"):
        CorpusIndex(str(tmp_path / "nothing"))
