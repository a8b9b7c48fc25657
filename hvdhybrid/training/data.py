"""Data sets as index -> rows, and the sampler every rank computes identically."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from ..errors import InputError

__all__ = ["DataError", "Dataset", "TensorDataset", "Sampler", "digits", "image_folder", "read_csv_rows",
           "read_text", "split_indices"]


class DataError(InputError):
    """A data file or folder that cannot be used, named with what is wrong."""


def read_text(path: str, what: str = "a text file") -> str:
    """The whole file as text, or one DataError naming the file and what is wrong with it.

    A file with NUL bytes is called binary; one that is not UTF-8 is named
    with the line and byte where decoding failed (a leading BOM is dropped).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}); pass {what}") from None
    if b"\x00" in raw[:65536]:
        raise DataError(f"{path}: is not a text file (it holds NUL bytes: binary data?); pass {what}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        f"save it as UTF-8 and pass {what}") from None


def read_csv_rows(path: str, what: str) -> list[tuple[int, list[str]]]:
    """(1-based line, stripped cells) of every non-blank CSV row, or one DataError naming the file.

    Missing, binary, non-UTF-8, malformed or empty files are each one line that says to pass ``what``.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; pass {what}")
    text = read_text(path, what)
    rows: list[tuple[int, list[str]]] = []
    reader, start = csv.reader(io.StringIO(text, newline="")), 1
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                rows.append((start, [c.strip() for c in cells]))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not a CSV file the reader can take ({e}); "
                        f"pass {what}") from None
    if not rows:
        raise DataError(f"{path}: the file is empty; pass {what}")
    return rows


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int]) -> tuple[Any, Any]:
        """(inputs, targets) for these rows, already collated."""
        ...


@dataclass
class TensorDataset:
    """Rows of two tensors."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return self.x[idx], self.y[idx]

    def split(self, test_fraction: float, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
        """A fixed train/test split (independent of the training seed; see :func:`split_indices`)."""
        tr, te = split_indices(len(self), test_fraction, seed)
        return TensorDataset(self.x[tr], self.y[tr]), TensorDataset(self.x[te], self.y[te])


def split_indices(n: int, test_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) row indices of ``n`` rows: a seeded permutation, its first share is the test set."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


class Sampler:
    """Global batches of indices: a seeded permutation per epoch, the same on every rank.

    A partial batch at the end of an epoch is dropped so that every step has
    exactly ``batch_size`` rows.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if batch_size > n:
            raise DataError(f"--batch-size {batch_size} is larger than the data set ({n} rows); "
                            f"use --batch-size {n} or less")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._make()

    def _make(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def state(self) -> dict[str, int]:
        """Where the sampler stands; :meth:`load_state` puts it back exactly there."""
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed,
                "epoch": self.epoch, "pos": self.pos}

    def load_state(self, s: dict[str, int]) -> None:
        if (s["n"], s["batch_size"], s["seed"]) != (self.n, self.batch_size, self.seed):
            raise DataError(
                f"the checkpoint's sampler saw {s['n']} rows in batches of {s['batch_size']} with "
                f"seed {s['seed']}; this run has {self.n}, {self.batch_size}, {self.seed}: resume "
                "with the same data, --batch-size and --seed")
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._perm = self._make()

    def next(self) -> list[int]:
        if self.pos + self.batch_size > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._make()
        out = self._perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return out


def _upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def digits(image_size: int = 16) -> TensorDataset:
    """scikit-learn's 1,797 handwritten 8x8 digits (10 classes), upsampled, scaled to [0, 1]."""
    images, target = _digits_file()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    return TensorDataset(_upsample(x, image_size).contiguous(), torch.tensor(target, dtype=torch.long))


def _digits_file() -> tuple[np.ndarray, np.ndarray]:
    """The digits as ``sklearn.datasets.load_digits`` reads them, from the file scikit-learn ships.

    Read directly: importing scikit-learn costs about 2 s per rank at start-up.
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits data set ships with scikit-learn, which is not installed; "
                        "run bin/setup (or pip install scikit-learn)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def image_folder(root: str, image_size: int = 32) -> tuple[TensorDataset, list[str]]:
    """Images under ``root/<class>/*.{png,jpg,...}`` as RGB tensors; returns data and class names.

    Raises:
        DataError: missing folder, no class folders, or an unreadable image (named).
    """
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist; pass a folder with one "
                        "subfolder of images per class")
    classes = sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c)))
    if not classes:
        raise DataError(f"image folder {root!r} has no class subfolders (expected {root}/<class>/*.png)")
    xs, ys = [], []
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".webp")
    for label, c in enumerate(classes):
        for name in sorted(os.listdir(os.path.join(root, c))):
            if not name.lower().endswith(exts):
                continue
            path = os.path.join(root, c, name)
            try:
                with Image.open(path) as raw:
                    im = raw.convert("RGB").resize((image_size, image_size))
                    data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(f"cannot read image {path}: {e}") from None
            xs.append(data.view(image_size, image_size, 3).permute(2, 0, 1).float() / 255.0)
            ys.append(label)
    if not xs:
        raise DataError(f"image folder {root!r} holds no images with extensions {exts}")
    return TensorDataset(torch.stack(xs), torch.tensor(ys)), classes
