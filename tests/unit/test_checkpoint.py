"""Checkpoint files: atomic writes, manifests with checksums, finding the newest complete one."""

from __future__ import annotations

import os

import pytest
import torch

from hvdhybrid.training.checkpoint import (
    CheckpointError,
    Manifest,
    atomic_write,
    checksum,
    encode_shard,
    find_complete,
    load_file,
    prune,
    step_dir,
    verify,
    write_manifest,
)
from hvdhybrid.training.state import stage_file


def make(root: str, step: int, ranks: int = 2, manifest: bool = True) -> str:
    d = step_dir(root, step)
    os.makedirs(d, exist_ok=True)
    shards = {}
    for r in range(ranks):
        data = encode_shard({"step": step, "rank": r, "w": torch.full((3,), float(step))})
        atomic_write(os.path.join(d, stage_file(r, 0, 1)), data)
        shards[stage_file(r, 0, 1)] = (checksum(data), len(data))
    if manifest:
        write_manifest(root, Manifest(step, "mlp", ranks, (1, 1), shards))
    return d


def test_atomic_write_leaves_no_temporary_files(tmp_path) -> None:
    p = str(tmp_path / "f")
    atomic_write(p, b"one")
    atomic_write(p, b"two")
    assert open(p, "rb").read() == b"two" and os.listdir(tmp_path) == ["f"]


def test_latest_points_at_the_newest_complete_and_shards_load(tmp_path) -> None:
    root = str(tmp_path)
    make(root, 2)
    d = make(root, 4)
    assert open(os.path.join(root, "latest")).read().strip() == "step-000004"
    assert verify(d).step == 4
    assert torch.equal(load_file(d, stage_file(1, 0, 1))["w"], torch.full((3,), 4.0))


@pytest.mark.parametrize("damage", ["no-manifest", "truncated", "corrupt", "missing-shard"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_reason(tmp_path, damage: str) -> None:
    root = str(tmp_path)
    good = make(root, 2)
    bad = make(root, 4, manifest=damage != "no-manifest")
    shard = os.path.join(bad, stage_file(1, 0, 1))
    if damage == "truncated":
        data = open(shard, "rb").read()
        open(shard, "wb").write(data[: len(data) // 2])
    elif damage == "corrupt":
        data = bytearray(open(shard, "rb").read())
        data[-5] ^= 0xFF
        open(shard, "wb").write(bytes(data))
    elif damage == "missing-shard":
        os.remove(shard)
    path, warnings = find_complete(root)
    assert path == good
    assert len(warnings) == 1 and "step-000004" in warnings[0]
    with pytest.raises(CheckpointError):
        verify(bad)


def test_nothing_to_resume(tmp_path) -> None:
    assert find_complete(str(tmp_path / "none")) == (None, [])


def test_prune_keeps_the_newest_k(tmp_path) -> None:
    root = str(tmp_path)
    for s in (1, 2, 3, 4):
        make(root, s)
    make(root, 5, manifest=False)  # in progress: newer than every kept one, so it stays
    prune(root, 2)
    assert sorted(n for n in os.listdir(root) if n.startswith("step")) == \
        ["step-000003", "step-000004", "step-000005"]


def test_unreadable_manifest_and_wrong_format(tmp_path) -> None:
    d = make(str(tmp_path), 1)
    open(os.path.join(d, "manifest.json"), "w").write("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        verify(d)
    torch.save({"format": 99}, os.path.join(d, stage_file(0, 0, 1)))
    with pytest.raises(CheckpointError, match="format 99"):
        load_file(d, stage_file(0, 0, 1))


def test_checksums_are_crc32_and_a_sha256_checkpoint_still_verifies(tmp_path) -> None:
    import hashlib
    import json
    import zlib

    root = str(tmp_path)
    d = make(root, 2)
    m = json.load(open(os.path.join(d, "manifest.json")))
    name, entry = sorted(m["shards"].items())[0]
    data = open(os.path.join(d, name), "rb").read()
    assert entry["checksum"] == f"crc32:{zlib.crc32(data):08x}"
    for k in m["shards"]:  # as a checkpoint written before crc32 has it
        m["shards"][k] = {"sha256": hashlib.sha256(open(os.path.join(d, k), "rb").read()).hexdigest(),
                          "bytes": m["shards"][k]["bytes"]}
    open(os.path.join(d, "manifest.json"), "w").write(json.dumps(m))
    assert verify(d).step == 2
    with open(os.path.join(d, name), "r+b") as f:  # one byte changed, the size kept
        f.seek(len(data) // 2)
        f.write(bytes([data[len(data) // 2] ^ 1]))
    with pytest.raises(CheckpointError, match="corrupt"):
        verify(d)
