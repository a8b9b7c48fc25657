"""Checkpoint files written past the page cache hold exactly what torch.save wrote."""

from __future__ import annotations

import os
import random

import torch

from hvdhybrid.training import direct_io
from hvdhybrid.training.checkpoint import file_digest, load_file, write_shard


def test_writes_of_any_size_land_in_order(tmp_path) -> None:
    rng = random.Random(3)
    want = bytearray()
    path = str(tmp_path / "f")
    f = direct_io.open_direct(path)
    sizes = [1, 17, 4095, 4096, 4097, 1 << 20, direct_io.BLOCK - 3, direct_io.BLOCK]
    for _ in range(60):  # sizes around the block and the alignment
        piece = os.urandom(rng.choice(sizes))
        assert f.write(piece) == len(piece)
        want += piece
    f.close()
    assert open(path, "rb").read() == bytes(want)


def test_a_shard_written_direct_loads_and_hashes_as_one_written_through_the_page_cache(tmp_path) -> None:
    state = {"params": {"w": torch.randn(3_000_001), "b": torch.arange(7.0)}, "optimizer": {"step": 5}}
    a, b = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    da, db = write_shard(a, state, direct=True), write_shard(b, state)
    assert da == db == file_digest(a) == file_digest(b)
    got = load_file(str(tmp_path), "a.pt")
    assert torch.equal(got["params"]["w"], state["params"]["w"]) and got["optimizer"] == {"step": 5}


def test_a_file_system_without_o_direct_gets_an_ordinary_file(tmp_path, monkeypatch) -> None:
    real = os.open

    def refuse(path, flags, *a):  # type: ignore[no-untyped-def]
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real(path, flags, *a)

    monkeypatch.setattr(os, "open", refuse)
    f = direct_io.open_direct(str(tmp_path / "g"))
    assert not isinstance(f, direct_io.DirectFile)
    f.write(b"x" * 10)
    f.close()
    assert open(tmp_path / "g", "rb").read() == b"x" * 10


def test_a_file_system_that_refuses_the_writes_gets_them_without_o_direct(tmp_path, monkeypatch) -> None:
    real = os.write
    calls = []

    def picky(fd, data):  # type: ignore[no-untyped-def]
        import fcntl

        calls.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
        if calls[-1]:
            raise OSError(22, "Invalid argument")
        return real(fd, data)

    monkeypatch.setattr(os, "write", picky)
    path = str(tmp_path / "h")
    f = direct_io.open_direct(path)
    data = os.urandom(direct_io.BLOCK + 5000)
    f.write(data)
    f.close()
    assert calls[0] and not calls[-1]
    assert open(path, "rb").read() == data


def test_page_aligned_writes_go_out_from_where_they_are_and_land_in_order(tmp_path, monkeypatch) -> None:
    import mmap

    import numpy as np

    sent: list[int] = []
    real = direct_io.DirectFile._send
    monkeypatch.setattr(direct_io.DirectFile, "_send",
                        lambda self, v: (sent.append(direct_io._address(v)), real(self, v))[1])
    page = mmap.mmap(-1, 3 << 20)
    page[:] = os.urandom(3 << 20)
    src = np.frombuffer(page, dtype=np.uint8)
    path, want = str(tmp_path / "f"), bytearray()
    f = direct_io.open_direct(path)
    for piece in (memoryview(page)[: 2 << 20], b"x" * 100, memoryview(page)[: (2 << 20) + 10],
                  b"y" * 3986, memoryview(page)):  # aligned, then not, then aligned again (at 2 MB + 4096)
        f.write(piece)
        want += bytes(piece)
    f.close()
    assert open(path, "rb").read() == bytes(want)
    assert sent.count(int(src.ctypes.data)) == 2  # the first and the last: straight from the map


def test_shard_settings_are_restored_after_a_write(tmp_path) -> None:
    from torch.utils.serialization import config

    before = (torch.serialization.get_crc32_options(), config.save.storage_alignment)
    write_shard(str(tmp_path / "a.pt"), {"w": torch.randn(300_000)}, direct=True)
    assert (torch.serialization.get_crc32_options(), config.save.storage_alignment) == before
