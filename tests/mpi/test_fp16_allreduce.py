"""hvdhybrid's fp16 all-reduce (reused buckets, overlapped casts) averages exactly as Horovod's
``Compression.fp16`` does: the same float16 values on the wire, the same sum."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hvdhybrid.comm.fp16_allreduce import Fp16Allreduce
from hvdhybrid.comm.groups import ProcessGroups
from hvdhybrid.layout.topology import Layout


def _tensors(rank: int, step: int, sizes: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(n, generator=g) * 10 ** float(torch.randint(-4, 2, (1,), generator=g))
            for n in sizes]


@pytest.mark.parametrize("bucket_mb", [0.01, 4.0], ids=["many-buckets", "one-bucket"])
def test_equals_horovod_compression_fp16(world: Any, bucket_mb: float) -> None:
    import horovod.torch as hvd

    if world.Get_size() < 2:
        pytest.skip("needs 2 bundles")
    groups = ProcessGroups.create(Layout(world.Get_size(), (1,)), world)
    try:
        ps = groups.data_set
        ours = Fp16Allreduce(ps, f"test.{bucket_mb}", bucket_mb=bucket_mb)
        sizes = [3000, 17, 9000, 1, 2500]  # 9000 fp16 values (18 KB) is more than a 0.01 MB bucket
        for step in range(3):  # the buffers are reused from the second step on
            mine = _tensors(world.Get_rank(), step, sizes)
            ref = hvd.grouped_allreduce(_tensors(world.Get_rank(), step, sizes), name=f"ref.{bucket_mb}",
                                        op=hvd.Average, compression=hvd.Compression.fp16, process_set=ps)
            ours(mine)
            assert all(torch.equal(a, b) for a, b in zip(mine, ref)), step
            fp32 = hvd.grouped_allreduce(_tensors(world.Get_rank(), step, sizes), name=f"f32.{bucket_mb}",
                                         op=hvd.Average, process_set=ps)
            for a, b in zip(mine, fp32):  # float16 keeps 11 bits: within 1e-3 of each tensor's scale
                assert float((a - b).abs().max()) <= 1e-3 * float(b.abs().max()) + 1e-7
        assert ours.num_buckets == (1 if bucket_mb == 4.0 else 3)  # [3000, 17] [9000] [1, 2500]
        ours([torch.ones(5)])  # other tensors: planned again
        assert ours.num_buckets == 1
    finally:
        groups.close()
