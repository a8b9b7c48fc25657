"""Row arithmetic: batch checks, replica rows, and the re-batching pieces between widths."""

import re
from fractions import Fraction
from math import lcm

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvdhybrid.layout.rows import (
    BatchError,
    check_batch,
    peers,
    replica_rows,
    transfer_pieces,
)


def test_check_batch_ok():
    assert check_batch(64, 2, 4, (1, 1)) == 8
    assert check_batch(48, 2, 4, (2, 3)) == 6       # unit 2*4*lcm(2,3) = 48
    assert check_batch(7, 1, 1, (1,)) == 7


@pytest.mark.parametrize("batch, bundles, mbs, widths, unit", [
    (100, 2, 4, (2, 3), 48), (10, 2, 4, (1, 1), 8), (0, 1, 2, (1,), 2), (-5, 1, 1, (2,), 2),
    (50, 1, 3, (1,), 3)])
def test_check_batch_error_suggests_valid_sizes(batch, bundles, mbs, widths, unit):
    with pytest.raises(BatchError) as e:
        check_batch(batch, bundles, mbs, widths)
    msg = str(e.value)
    assert f"global batch {batch}" in msg and f"multiple of {unit}" in msg
    suggested = [int(n) for n in re.findall(r"--batch-size (\d+)", msg)]
    suggested += [int(n) for n in re.findall(r" or (\d+)$", msg)]
    assert len(suggested) == 2
    for s in suggested:
        assert s > 0 and s % unit == 0
        check_batch(s, bundles, mbs, widths)  # does not raise
    if batch >= unit:  # the nearest multiples on either side
        assert suggested[0] <= batch < suggested[1]


def test_check_batch_bad_microbatches():
    with pytest.raises(BatchError, match="--microbatches"):
        check_batch(8, 1, 0, (1,))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.lists(st.integers(1, 4), min_size=1, max_size=3),
       st.integers(1, 3))
def test_replica_rows_partition_global_batch(bundles, mbs, widths, k):
    batch = bundles * mbs * lcm(*widths) * k
    assert check_batch(batch, bundles, mbs, tuple(widths)) == batch // (bundles * mbs)
    for w in widths:
        chunk = batch // (bundles * mbs * w)
        rows = [replica_rows(batch, bundles, b, mbs, m, w, r)
                for b in range(bundles) for m in range(mbs) for r in range(w)]
        # the n-th (bundle, mb, replica) in that order gets the n-th chunk of the batch
        assert rows == [(n * chunk, (n + 1) * chunk) for n in range(bundles * mbs * w)]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 4))
def test_transfer_pieces_cover_and_map_rows(sw, dw, k):
    rows = lcm(sw, dw) * k
    a, b = rows // sw, rows // dw
    pieces = transfer_pieces(rows, sw, dw)
    dst_hits = [0] * rows
    src_hits = [0] * rows
    for p in pieces:
        assert 0 <= p.src_replica < sw and 0 <= p.dst_replica < dw
        n = p.src_stop - p.src_start
        assert n > 0 and 0 <= p.src_start and p.src_stop <= a and p.dst_start + n <= b
        for t in range(n):
            g_src = p.src_replica * a + p.src_start + t
            g_dst = p.dst_replica * b + p.dst_start + t
            assert g_src == g_dst  # a row lands where it belongs in the global order
            src_hits[g_src] += 1
            dst_hits[g_dst] += 1
    assert dst_hits == [1] * rows and src_hits == [1] * rows
    for j in range(dw):  # within a destination: source order, contiguous from 0
        mine = [p for p in pieces if p.dst_replica == j]
        assert [p.src_replica for p in mine] == sorted(p.src_replica for p in mine)
        starts = [p.dst_start for p in mine]
        ends = [p.dst_start + p.src_stop - p.src_start for p in mine]
        assert starts[0] == 0 and starts[1:] == ends[:-1] and ends[-1] == b


def _overlapping(sw, dw):
    """Pairs whose shares of a batch overlap, computed with exact fractions."""
    return {(i, j) for i in range(sw) for j in range(dw)
            if max(Fraction(i, sw), Fraction(j, dw)) < min(Fraction(i + 1, sw), Fraction(j + 1, dw))}


@pytest.mark.parametrize("sw, dw", [(1, 1), (1, 3), (3, 1), (2, 3), (4, 6), (3, 3), (5, 2)])
def test_peers_independent_of_rows(sw, dw):
    expected = _overlapping(sw, dw)
    assert set(peers(sw, dw)) == expected
    for k in range(1, 6):
        rows = lcm(sw, dw) * k
        assert {(p.src_replica, p.dst_replica) for p in transfer_pieces(rows, sw, dw)} == expected


def test_peers_golden():
    assert peers(2, 3) == [(0, 0), (0, 1), (1, 1), (1, 2)]
    assert peers(1, 2) == [(0, 0), (0, 1)]


def test_transfer_pieces_uneven_rows():
    with pytest.raises(BatchError):
        transfer_pieces(5, 2, 1)
    with pytest.raises(BatchError):
        transfer_pieces(6, 2, 4)
