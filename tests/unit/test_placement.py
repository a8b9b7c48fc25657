"""Placement of model stages on stage groups: constructors, parsing, queries and error messages."""

import pytest

from hvdhybrid.errors import InputError
from hvdhybrid.layout.placement import Placement, PlacementError


def test_identity():
    p = Placement.identity(3)
    assert p.positions == (0, 1, 2)
    assert (p.num_stages, p.num_positions) == (3, 3)
    assert [p.stages_on(i) for i in range(3)] == [[0], [1], [2]]
    assert Placement.identity(1).positions == (0,)


@pytest.mark.parametrize("k, n, want", [
    (4, 2, (0, 1, 0, 1)),
    (5, 2, (0, 1, 0, 1, 0)),   # not a multiple: the first positions run one more stage
    (6, 3, (0, 1, 2, 0, 1, 2)),
    (3, 3, (0, 1, 2)),
    (3, 1, (0, 0, 0)),
])
def test_looped(k, n, want):
    assert Placement.looped(k, n).positions == want


@pytest.mark.parametrize("k, n, want", [
    (4, 2, (0, 0, 1, 1)),
    (5, 2, (0, 0, 0, 1, 1)),   # earlier positions get the extra stage
    (7, 3, (0, 0, 0, 1, 1, 2, 2)),
    (3, 3, (0, 1, 2)),
    (3, 1, (0, 0, 0)),
])
def test_contiguous(k, n, want):
    assert Placement.contiguous(k, n).positions == want


def test_constructors_for_many_sizes():
    for k in range(1, 13):
        for n in range(1, k + 1):
            loop, cont = Placement.looped(k, n), Placement.contiguous(k, n)
            for p in (loop, cont):
                assert (p.num_stages, p.num_positions) == (k, n)
                assert sorted(s for i in range(n) for s in p.stages_on(i)) == list(range(k))
            sizes = [len(cont.stages_on(i)) for i in range(n)]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            assert list(cont.positions) == sorted(cont.positions)
            assert all(loop.position_of(s) == s % n for s in range(k))


def test_queries():
    p = Placement.looped(4, 2)
    assert p.stages_on(0) == [0, 2] and p.stages_on(1) == [1, 3]
    assert [p.position_of(s) for s in range(4)] == [0, 1, 0, 1]
    assert not p.local_edge(0, 1) and p.local_edge(0, 2) and p.local_edge(3, 1)
    c = Placement.contiguous(4, 2)
    assert c.local_edge(0, 1) and not c.local_edge(1, 2) and c.local_edge(2, 3)


def test_describe():
    assert Placement.looped(4, 2).describe() == "stages 0,2 on position 0; 1,3 on position 1"
    assert Placement.contiguous(5, 2).describe() == "stages 0,1,2 on position 0; 3,4 on position 1"
    assert Placement.identity(2).describe() == "stages 0 on position 0; 1 on position 1"
    assert Placement.identity(1).describe() == "stage 0 on position 0"


def test_frozen_and_hashable():
    p = Placement((0, 1, 0, 1))
    assert p == Placement.looped(4, 2) and hash(p) == hash(Placement.looped(4, 2))
    with pytest.raises(AttributeError):
        p.positions = (0,)  # type: ignore[misc]
    assert Placement([0, 1]).positions == (0, 1)  # a list from a config file is frozen to a tuple


@pytest.mark.parametrize("positions, match", [
    ((), "at least one stage"),
    ((0, -1), r"integers >= 0, got stage 1 -> -1"),
    ((0, 1.5), r"integers >= 0, got stage 1 -> 1.5"),
    ((0, 2, 2), r"positions \[1\] run no stage in placement \[0, 2, 2\].*renumber"),
    ((1, 1), r"positions \[0\] run no stage"),
])
def test_invalid_positions(positions, match):
    with pytest.raises(PlacementError, match=match):
        Placement(positions)


def test_errors_are_input_errors():
    assert issubclass(PlacementError, InputError)


@pytest.mark.parametrize("call, match", [
    (lambda: Placement.identity(0), "at least one stage, got 0"),
    (lambda: Placement.looped(4, 0), "at least one position, got 0"),
    (lambda: Placement.looped(2, 3), "cannot place 2 stages on 3 positions.*use at most 2 positions"),
    (lambda: Placement.contiguous(2, 3), "cannot place 2 stages on 3 positions"),
    (lambda: Placement.looped(4, 2).stages_on(2), "position 2 does not exist; there are 2"),
    (lambda: Placement.looped(4, 2).position_of(4), "stage 4 does not exist; the placement covers 4"),
    (lambda: Placement.looped(4, 2).local_edge(0, 9), "stage 9 does not exist"),
])
def test_constructor_and_query_errors(call, match):
    with pytest.raises(PlacementError, match=match):
        call()


@pytest.mark.parametrize("text, k, n, want", [
    ("identity", 3, 3, (0, 1, 2)),
    ("looped", 4, 2, (0, 1, 0, 1)),
    ("contiguous", 4, 2, (0, 0, 1, 1)),
    (" Looped ", 5, 2, (0, 1, 0, 1, 0)),
    ("0,1,0,1", 4, 2, (0, 1, 0, 1)),
    (" 1, 0 ,0 ,1", 4, 2, (1, 0, 0, 1)),
    ("0", 1, 1, (0,)),
])
def test_parse(text, k, n, want):
    assert Placement.parse(text, k, n).positions == want


@pytest.mark.parametrize("text, k, n, match", [
    ("zigzag", 4, 2,
     r"cannot read placement 'zigzag': use one of identity, looped, contiguous, v .*'0,1,0,1'"),
    ("0,a,0,1", 4, 2, r"cannot read placement '0,a,0,1'"),
    ("", 2, 2, "cannot read placement ''"),
    ("0,1,0", 4, 2, r"gives 3 positions but the model has 4 stages; give one position per stage"),
    ("0,1,2,1", 4, 2, r"names positions \[2\], but there are 2 positions \(0..1\)"),
    ("0,-1,0,1", 4, 2, r"names positions \[-1\]"),
    ("0,0,0,0", 4, 2, r"gives no stage to positions \[1\] of 2"),
    ("identity", 4, 2, "needs one position per stage.*use 'looped' or 'contiguous'"),
    ("looped", 2, 3, "cannot place 2 stages on 3 positions"),
    ("0,1", 2, 3, "cannot place 2 stages on 3 positions"),
])
def test_parse_errors(text, k, n, match):
    with pytest.raises(PlacementError, match=match):
        Placement.parse(text, k, n)
