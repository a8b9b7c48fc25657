"""Bytes per step on each host link (traffic.py) and mpirun's --map-by placement (hostfile.py)."""

from __future__ import annotations

import pytest

from hvdhybrid.layout.hostfile import Host, HostfileError, place_ranks
from hvdhybrid.layout.topology import Layout
from hvdhybrid.layout.traffic import ModelSizes, cross_host_bytes, describe_links, link_bytes

MB = 1e6
TWO = [Host("h0", 2), Host("h1", 2)]


def test_map_by_slot_and_node() -> None:
    assert place_ranks(TWO, 4) == ["h0", "h0", "h1", "h1"]
    assert place_ranks(TWO, 4, "node") == ["h0", "h1", "h0", "h1"]
    assert place_ranks([Host("a", 3), Host("b", 1)], 4, "node") == ["a", "b", "a", "a"]
    with pytest.raises(HostfileError, match="--map-by"):
        place_ranks(TWO, 4, "core")


def test_slot_keeps_activations_in_the_host_node_keeps_gradients() -> None:
    """2 bundles x 2 stages on 2 hosts: 100 MB of parameters (50 per stage), 20 MB of activations."""
    lay = Layout(4, (1, 1))
    sizes = ModelSizes.even(100 * MB, 2, 20 * MB, fp16_compression=True)
    slot = link_bytes(lay, place_ranks(TWO, 4), sizes)
    # ring of 2: each member sends its 25 MB fp16 piece once; 2 data groups x 2 members
    assert slot[("h0", "h1")] == pytest.approx(100 * MB)
    assert slot[("h0", "h0")] == pytest.approx(20 * MB)  # 10 MB per bundle, forward + backward
    node = link_bytes(lay, place_ranks(TWO, 4, "node"), sizes)
    assert node[("h0", "h1")] == pytest.approx(40 * MB) and cross_host_bytes(node) == pytest.approx(40 * MB)
    fp32 = link_bytes(lay, place_ranks(TWO, 4), ModelSizes.even(100 * MB, 2, 20 * MB, fp16_compression=False))
    assert fp32[("h0", "h1")] == pytest.approx(200 * MB)
    assert describe_links(slot)[0].startswith("h0 <-> h1: 100 MB/step (network)")


def test_ring_of_four_and_rebatching_and_tensor() -> None:
    hosts = ["a", "b", "c", "d"]
    one_stage = link_bytes(Layout(4, (1,)), hosts, ModelSizes((40 * MB,), 0.0, fp16_gradients=False))
    # each member sends 2*(4-1)/4 = 1.5 x 40 MB to the next one in the ring
    assert one_stage[("a", "b")] == pytest.approx(60 * MB) and one_stage[("a", "d")] == pytest.approx(60 * MB)
    # widths 2,1: each front replica sends its half of the rows to the one rear rank
    lay = Layout(3, (2, 1))
    got = link_bytes(lay, ["x", "y", "z"], ModelSizes((0.0, 0.0), 8 * MB))
    assert got[("x", "z")] == pytest.approx(8 * MB) and got[("y", "z")] == pytest.approx(8 * MB)
    # tensor 2: each tensor rank sends its own copy of the activations; gradients of a shard
    lay = Layout(4, (1, 1), tensor=2)
    got = link_bytes(lay, ["p", "q", "r", "s"], ModelSizes((0.0, 0.0), 8 * MB))
    assert sum(got.values()) == pytest.approx(2 * 2 * 8 * MB)


def test_sizes_must_fit_the_layout() -> None:
    with pytest.raises(ValueError):
        link_bytes(Layout(4, (1, 1)), ["h0"] * 3, ModelSizes.even(1.0, 2, 0.0))
    with pytest.raises(ValueError):
        link_bytes(Layout(4, (1, 1)), ["h0"] * 4, ModelSizes.even(1.0, 3, 0.0))
