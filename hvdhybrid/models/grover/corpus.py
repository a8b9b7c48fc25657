"""GROVER's pretraining corpora: where the SMILES come from, copied once into an index read by shard.

``--corpus moses|rdkit|FILE``: MOSES (1,584,663 drug-like molecules, PyPI
``molsets``), the 15,000 molecules RDKit ships, or a CSV / .smi file
(``.gz`` too). The first run over a corpus copies its SMILES once, without
parsing them, into the cache directory:

    clean.smi    every record's SMILES, one per line, in file order (not parsed yet)
    offsets.npy  byte offset of every SHARD-th line (so a shard reads with one seek)
    meta.json    counts and the vocabularies (from a strided sample, parsed)

Later runs read the index and nothing else. Reading is streamed: memory does
not grow with the corpus (the offsets are 8 bytes per SHARD molecules). A
record that does not parse is found when training featurises it: it keeps
its row as a stand-in that weighs nothing, so every layout sees the same
batches, and it is counted.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator, Optional

import numpy as np

from ...training.data import DataError
from .workers import Workers, parse_chunk

__all__ = ["CORPORA", "CorpusIndex", "CorpusSource", "SHARD", "default_cache", "held_out", "index_corpus",
           "index_path", "resolve_corpus"]

CORPORA = ("moses", "rdkit")
SHARD = 1024  # molecules per shard: the unit of seeking and of the shuffle's shard order
_CHUNK = 2000  # records per parse task


def default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(base, "hvdhybrid", "corpus")


@dataclass(frozen=True)
class CorpusSource:
    """Files of SMILES read in order; ``column``: the SMILES column of CSV files (None: the default)."""

    name: str
    paths: tuple[str, ...]
    column: str | int | None = None

    def key(self) -> str:
        """What the cache is keyed by: the files' paths, sizes and times, and the column."""
        parts = [self.name, repr(self.column)]
        for p in self.paths:
            st = os.stat(p)
            parts += [os.path.abspath(p), str(st.st_size), str(st.st_mtime_ns)]
        return hashlib.blake2b("|".join(parts).encode(), digest_size=10).hexdigest()

    def records(self) -> Iterator[str]:
        """Every record's SMILES text (empty where a row has none), in file order."""
        for p in self.paths:
            yield from _file_records(p, self.column)


def _package_file(package: str, *parts: str) -> Optional[str]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    return path if os.path.isfile(path) else None


def resolve_corpus(spec: str, column: str | int | None = None) -> CorpusSource:
    """``moses``, ``rdkit`` or a file path, checked to exist."""
    if spec == "moses":
        path = _package_file("moses", "dataset", "data", "train.csv.gz")
        if path is None:
            raise DataError("--corpus moses needs the molsets package: pip install --no-deps molsets==0.3.1 "
                            "(bin/setup does), or pass --corpus rdkit or a file")
        return CorpusSource("moses", (path,), "SMILES")
    if spec == "rdkit":
        from .molfiles import _rdkit_file

        return CorpusSource("rdkit", (_rdkit_file("Data", "Pains", "test_data", "wehi_mols.csv"),
                                      _rdkit_file("Data", "NCI", "first_5K.smi")), 0)
    if not os.path.isfile(spec):
        raise DataError(f"--corpus {spec}: no such file; pass moses, rdkit, or the path of a CSV or "
                        ".smi file of SMILES (.gz too)")
    return CorpusSource(spec, (spec,), column)


def _open(path: str) -> IO[str]:
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", errors="replace", newline="")
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


def _file_records(path: str, column: str | int | None) -> Iterator[str]:
    try:
        yield from _records(path, column)
    except (csv.Error, UnicodeDecodeError, EOFError, gzip.BadGzipFile, OSError) as e:
        raise DataError(f"{path}: is not a text file of SMILES ({e}); pass a CSV or .smi file "
                        "(.gz too)") from None


def _records(path: str, column: str | int | None) -> Iterator[str]:
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as raw:
        if b"\x00" in raw.read(65536):
            raise DataError(f"{path}: is not a text file (it holds NUL bytes: binary data?); pass a CSV or "
                            ".smi file of SMILES (.gz too)")
    base = path[:-3] if path.endswith(".gz") else path
    smi = base.lower().endswith(".smi")
    with _open(path) as f:
        rows: Iterator[list[str]] = (ln.split() for ln in f) if smi else csv.reader(f)
        first = next(rows, None)
        while first is not None and not first:
            first = next(rows, None)
        if first is None:
            return
        header = any("smiles" in c.lower() for c in first) or isinstance(column, str)
        if header:
            names = [c.strip() for c in first]
            if isinstance(column, str):
                if column not in names:
                    raise DataError(f"{path}:1: no SMILES column {column!r}; the columns are "
                                    f"{', '.join(map(repr, names))}: pass one with --smiles-col")
                col = names.index(column)
            else:
                col = column if column is not None else next(i for i, c in enumerate(names)
                                                             if "smiles" in c.lower())
        else:
            col = column if isinstance(column, int) else 0
        if not header:
            yield first[col].strip() if col < len(first) else ""
        for cells in rows:
            if cells:
                yield cells[col].strip() if col < len(cells) else ""


class CorpusIndex:
    """A checked corpus: ``n`` molecules read by id (line of ``clean.smi``), a shard at a time."""

    def __init__(self, path: str, cache_shards: int = 64) -> None:
        self.dir = path
        try:
            with open(os.path.join(path, "meta.json")) as f:
                self.meta: dict[str, Any] = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: no complete corpus index there ({e}); delete the directory and "
                            "rerun, which makes it again") from None
        self.n: int = int(self.meta["molecules"])
        if int(self.meta["shard"]) != SHARD:
            raise DataError(f"{path}: an index of shards of {self.meta['shard']}, not {SHARD}; delete it "
                            "and rerun (it is rebuilt)")
        self.offsets = np.load(os.path.join(path, "offsets.npy"))
        self._file = open(os.path.join(path, "clean.smi"), "rb")
        self._shards: OrderedDict[int, list[str]] = OrderedDict()
        self._cache_shards = cache_shards

    @property
    def vocabs(self) -> tuple[str, str]:
        """(atom, bond) vocabularies as JSON."""
        return self.meta["atom_vocab"], self.meta["bond_vocab"]

    def shard(self, k: int) -> list[str]:
        if k in self._shards:
            self._shards.move_to_end(k)
            return self._shards[k]
        self._file.seek(int(self.offsets[k]))
        size = int(self.offsets[k + 1] - self.offsets[k])
        lines = [ln.decode() for ln in self._file.read(size).split(b"\n")[:-1]]  # "\n" only: see _fill
        self._shards[k] = lines
        if len(self._shards) > self._cache_shards:
            self._shards.popitem(last=False)
        return lines

    def smiles(self, ids: list[int]) -> list[str]:
        return [self.shard(i // SHARD)[i % SHARD] for i in ids]

    def close(self) -> None:
        self._file.close()


def index_path(source: CorpusSource, cache: Optional[str] = None, limit: int = 0,
               vocab_molecules: int = 20000) -> str:
    """Where the index of ``source`` (its first ``limit`` records) is, or will be, kept."""
    return os.path.join(cache or default_cache(), f"{source.key()}-n{limit}-v{vocab_molecules}")


def index_corpus(source: CorpusSource, workers: Workers, cache: Optional[str] = None, limit: int = 0,
                 vocab_molecules: int = 20000, say: Callable[[str], None] = lambda m: None) -> str:
    """The directory of the corpus's index (the first ``limit`` records; 0: all), made on first use.

    One process makes it (the others open it after): the records are copied to
    ``clean.smi`` without parsing; about ``vocab_molecules`` of them, spread
    over the corpus, are parsed by ``workers`` for the vocabularies. None of
    those parsing is an error; single bad records are counted as training meets them.
    """
    root = cache or default_cache()
    path = index_path(source, cache, limit, vocab_molecules)
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    t0 = time.perf_counter()
    say(f"indexing {source.name}, once (cached in {root})")
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".index-", dir=root)
    except OSError as e:
        raise DataError(f"--corpus-cache {root}: cannot write there ({e.strerror}); pass a writable "
                        "directory") from None
    try:
        total, bad, n_sample = _fill(tmp, source, limit, vocab_molecules, workers)
        os.rename(tmp, path)
    except OSError as e:
        if os.path.isfile(os.path.join(path, "meta.json")):  # another run wrote it first
            return path
        raise DataError(f"--corpus-cache {root}: writing the index failed ({e.strerror}); free some "
                        "space or pass another directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; else half made
    say(f"indexed {source.name}: {total:,} records in {time.perf_counter() - t0:.0f} s; vocabularies "
        f"from {n_sample:,} of them ({bad:,} did not parse)")
    return path


def _fill(tmp: str, source: CorpusSource, limit: int, vocab_molecules: int,
          workers: Workers) -> tuple[int, int, int]:
    """Write the index into ``tmp``: the SMILES of the first ``limit`` records (0: all) and the shard
    offsets in one pass over the source, then the vocabularies of about ``vocab_molecules`` records
    spread over them (read back from ``clean.smi``). Returns (records, sampled ones that did not
    parse, records sampled)."""
    offsets = [0]
    pos = total = 0
    with open(os.path.join(tmp, "clean.smi"), "wb") as out:
        for smi in source.records():
            # one record per line, split on "\n" alone when read (CorpusIndex.shard)
            line = (smi.replace("\n", " ").replace("\r", " ") + "\n").encode()
            out.write(line)
            pos += len(line)
            total += 1
            if total % SHARD == 0:
                offsets.append(pos)
            if total == limit:
                break
    if total == 0:
        raise DataError(f"{source.name}: the file is empty; pass a file with one SMILES per row")
    if total % SHARD:
        offsets.append(pos)
    np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, dtype=np.int64))
    every = max(1, total // max(1, vocab_molecules))
    with open(os.path.join(tmp, "clean.smi"), "rb") as f:
        sample = [ln[:-1].decode() for r, ln in enumerate(f) if r % every == 0]
    chunks = ((i, sample[i:i + _CHUNK]) for i in range(0, len(sample), _CHUNK))
    bad = 0
    atoms: Counter[str] = Counter()
    bonds: Counter[str] = Counter()
    for b, a, bo in workers.map(parse_chunk, chunks):
        bad += len(b)
        atoms.update(a)
        bonds.update(bo)
    if bad == len(sample):
        raise DataError(f"{source.name}: none of its SMILES could be parsed ({len(sample):,} tried); check "
                        "the file, or pick the SMILES column with --smiles-col")
    from .features import Vocab

    meta = {"source": source.name, "files": list(source.paths), "molecules": total, "shard": SHARD,
            "sampled": len(sample), "sampled_unparsable": bad,
            "atom_vocab": Vocab(atoms.elements()).to_json(), "bond_vocab": Vocab(bonds.elements()).to_json()}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
    return total, bad, len(sample)


def held_out(index: CorpusIndex, count: int) -> list[str]:
    """The SMILES of the corpus's first ``count`` molecules (at most half): held out for validation.

    The first, so that the held-out set stays the same whatever prefix of the corpus is used.
    """
    if index.n < 2:
        raise DataError(f"pretraining needs at least 2 molecules, the corpus has {index.n}")
    return index.smiles(list(range(min(count, index.n // 2))))
