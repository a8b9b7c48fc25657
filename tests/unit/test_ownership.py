"""Slices of sharded parameters: cut and join are inverses, for plain and block-strided shards."""

from __future__ import annotations

import pytest
import torch

from hvdhybrid.parallel.ownership import Sharded, cut, join


@pytest.mark.parametrize("dim,size,parts", [(0, 2, 1), (1, 4, 1), (1, 2, 3), (0, 3, 3)])
def test_join_of_every_cut_is_the_whole(dim: int, size: int, parts: int) -> None:
    full = torch.arange(36 * 36).reshape(36, 36)
    pieces = [cut(full, Sharded(dim, size, i, parts)) for i in range(size)]
    assert all(p.shape[dim] == full.shape[dim] // size for p in pieces)
    assert torch.equal(join(pieces, dim, parts), full)


def test_a_strided_shard_holds_its_slice_of_each_block() -> None:
    qkv = torch.arange(12)  # q = 0..3, k = 4..7, v = 8..11; 2 tensor ranks
    assert cut(qkv, Sharded(0, 2, 0, parts=3)).tolist() == [0, 1, 4, 5, 8, 9]
    assert cut(qkv, Sharded(0, 2, 1, parts=3)).tolist() == [2, 3, 6, 7, 10, 11]
