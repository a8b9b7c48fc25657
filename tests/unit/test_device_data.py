"""Device choice falls back to the CPU here; data sets load, split and fail with clear errors."""

from __future__ import annotations

import pytest
import torch

from hvdhybrid.training.data import DataError, Sampler, digits, image_folder
from hvdhybrid.training.device import DeviceError, pick_device


def test_auto_device_is_cpu_without_a_gpu_and_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        pick_device("cuda")


def test_digits_are_real_and_split_deterministically() -> None:
    ds = digits(16)
    assert len(ds) == 1797 and ds.x.shape[1:] == (1, 16, 16) and set(ds.y.tolist()) == set(range(10))
    a, b = ds.split(0.2, seed=0)
    a2, b2 = ds.split(0.2, seed=0)
    assert len(b) == 359 and torch.equal(b.x, b2.x) and len(a) + len(b) == 1797


def test_sampler_is_a_permutation_per_epoch_and_rejects_oversized_batches() -> None:
    s = Sampler(10, 3, seed=1)
    first = [i for _ in range(3) for i in s.next()]
    assert len(set(first)) == 9  # one epoch, no repeats; the partial batch is dropped
    assert s.next() and s.epoch == 1
    with pytest.raises(DataError, match="larger than the data set"):
        Sampler(4, 5, seed=0)


def test_image_folder(tmp_path) -> None:
    from PIL import Image

    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (10, 12), color).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    ds, classes = image_folder(str(tmp_path), 8)
    assert classes == ["cat", "dog"] and len(ds) == 6 and ds.x.shape[1:] == (3, 8, 8)
    assert ds.x[0, 0].mean() == pytest.approx(1.0) and ds.y.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "cat" / "bad.png").write_text("not an image")
    with pytest.raises(DataError, match="bad.png"):
        image_folder(str(tmp_path), 8)
    with pytest.raises(DataError, match="does not exist"):
        image_folder(str(tmp_path / "nope"), 8)


def test_read_text_names_a_binary_or_non_utf8_file(tmp_path) -> None:
    """Regression: a file of random bytes given to `grover finetune` ended in a csv.Error traceback."""
    import pytest

    from hvdhybrid.training.data import DataError, read_text

    binary = tmp_path / "blob.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"blob.csv: is not a text file \(it holds NUL bytes"):
        read_text(str(binary), "a CSV file")
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"smiles,y\nCCO,1\n\xe9CC,2\n")
    with pytest.raises(DataError, match=r"latin.csv:3: is not UTF-8 text \(byte 0xe9 at offset 15\)"):
        read_text(str(latin), "a CSV file")
    with pytest.raises(DataError, match="cannot read it"):
        read_text(str(tmp_path / "missing.csv"))
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffsmiles\nCCO\n".encode("utf-8"))
    assert read_text(str(bom)) == "smiles\nCCO\n"
