"""Layout arithmetic: coordinates, groups, inverse mapping and error messages (no MPI)."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvdhybrid.layout.topology import Layout, LayoutError, RankCoord, parse_bundle_shape


def test_golden_world8_widths_1_3():
    lay = Layout(8, (1, 3))
    assert (lay.num_bundles, lay.num_stages, lay.bundle_size) == (2, 2, 4)
    assert [lay.bundle_members(b) for b in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    stage_groups = [lay.stage_members(b, s) for b in range(2) for s in range(2)]
    assert stage_groups == [[0], [1, 2, 3], [4], [5, 6, 7]]
    assert lay.all_data_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    coords = [(c.bundle, c.stage, c.replica) for c in map(lay.coord, range(8))]
    assert coords == [(0, 0, 0), (0, 1, 0), (0, 1, 1), (0, 1, 2),
                      (1, 0, 0), (1, 1, 0), (1, 1, 1), (1, 1, 2)]


def test_golden_world6_widths_2_1():
    lay = Layout(6, (2, 1))
    assert lay.coord(4) == RankCoord(4, 1, 0, 1)
    assert lay.coord(5) == RankCoord(5, 1, 1, 0)
    assert lay.all_data_groups() == [[0, 3], [1, 4], [2, 5]]
    assert lay.stage_members(1, 0) == [3, 4]
    assert lay.bundle_local_rank(1, 0) == 2


def test_pipeline_constructor():
    assert Layout.pipeline(6, 3).widths == (1, 1, 1)
    with pytest.raises(LayoutError, match="--stages"):
        Layout.pipeline(6, 0)


SHAPES = [(1,), (1, 1), (2, 1), (1, 3), (2, 2, 2, 2)]


def _worlds(size):
    """A few world sizes that fit ``size``, the largest at most 4096."""
    top = 4096 // size
    return sorted({size, 2 * size, 3 * size, top * size})


@pytest.mark.parametrize("widths", SHAPES)
def test_inverse_and_groups_partition_world(widths):
    size = sum(widths)
    for world in _worlds(size):
        lay = Layout(world, widths)
        nb = world // size
        for r in range(world):
            c = lay.coord(r)
            assert c.rank == r
            assert lay.rank_of(c.bundle, c.stage, c.replica) == r
        bundles = [lay.bundle_members(b) for b in range(nb)]
        stages = [lay.stage_members(b, s) for b in range(nb) for s in range(len(widths))]
        data = lay.all_data_groups()
        for groups, sizes in ((bundles, [size] * nb),
                              (stages, [w for _ in range(nb) for w in widths]),
                              (data, [nb] * size)):
            assert [len(g) for g in groups] == sizes
            flat = sorted(r for g in groups for r in g)
            assert flat == list(range(world))  # every rank in exactly one group


def test_coord_and_rank_of_out_of_range():
    lay = Layout(8, (1, 3))
    for bad in (-1, 8):
        with pytest.raises(LayoutError, match="outside a world of 8"):
            lay.coord(bad)
    for args in ((2, 0, 0), (0, 2, 0), (0, 0, 1), (0, 1, 3)):
        with pytest.raises(LayoutError, match="no rank"):
            lay.rank_of(*args)


def test_layout_error_names_sizes_and_suggests_np():
    with pytest.raises(LayoutError) as e:
        Layout(6, (2, 2))
    msg = str(e.value)
    assert "world size 6" in msg and "bundle size 4" in msg
    suggested = [int(n) for n in re.findall(r"-np (\d+)", msg)]
    assert suggested and all(n % 4 == 0 and n != 6 for n in suggested)
    assert "-np 4" in msg


@pytest.mark.parametrize("world, widths", [(0, (1,)), (-3, (1,)), (4, ()), (4, (1, 0)),
                                           (4, (-1,)), (3, (1, 1))])
def test_layout_rejects(world, widths):
    with pytest.raises(LayoutError):
        Layout(world, widths)


@pytest.mark.parametrize("text, expected", [("1", (1,)), ("2,1", (2, 1)), (" 1 , 3 ", (1, 3)),
                                            ("2,2,2,2", (2, 2, 2, 2))])
def test_parse_bundle_shape_ok(text, expected):
    assert parse_bundle_shape(text) == expected


@pytest.mark.parametrize("text", ["", ",", "1,", "a", "1;2", "1.5", "0", "2,0", "-1", "1,,2"])
def test_parse_bundle_shape_errors(text):
    with pytest.raises(LayoutError, match="bundle shape"):
        parse_bundle_shape(text)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_bundle_shape_total(text):
    try:
        widths = parse_bundle_shape(text)
    except LayoutError:
        return
    assert isinstance(widths, tuple) and widths
    assert all(isinstance(w, int) and w >= 1 for w in widths)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.lists(st.integers(-2, 40), max_size=6))
def test_layout_constructs_or_layout_error(world, widths):
    try:
        lay = Layout(world, tuple(widths))
    except LayoutError:
        assert not widths or min(widths) < 1 or world % sum(widths)
        return
    assert lay.num_bundles * lay.bundle_size == world
    last = lay.coord(world - 1)
    assert (last.bundle, last.stage, last.replica) == (lay.num_bundles - 1, len(widths) - 1,
                                                       widths[-1] - 1)


def test_golden_world8_two_stages_tensor2():
    lay = Layout(8, (1, 1), tensor=2)
    assert (lay.num_bundles, lay.bundle_size) == (2, 4)
    coords = [(c.bundle, c.stage, c.replica, c.tensor) for c in map(lay.coord, range(8))]
    assert coords == [(0, 0, 0, 0), (0, 0, 0, 1), (0, 1, 0, 0), (0, 1, 0, 1),
                      (1, 0, 0, 0), (1, 0, 0, 1), (1, 1, 0, 0), (1, 1, 0, 1)]
    assert [lay.stage_members(b, s) for b in range(2) for s in range(2)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.tensor_members(1, 1, 0) == [6, 7]
    assert lay.row_members(0, 0, 1) == [1]
    assert lay.all_data_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_golden_world12_widths_1_2_tensor2():
    """Rows and tensors together: stage 1 has 2 replicas of 2 tensor ranks each."""
    lay = Layout(12, (1, 2), tensor=2)
    assert lay.bundle_size == 6 and lay.num_bundles == 2
    assert lay.coord(4) == RankCoord(4, 0, 1, 1, 0)
    assert lay.coord(11) == RankCoord(11, 1, 1, 1, 1)
    assert lay.stage_members(0, 1) == [2, 3, 4, 5]
    assert lay.row_members(0, 1, 1) == [3, 5]
    assert lay.tensor_members(0, 1, 1) == [4, 5]
    assert lay.data_members(1, 1, 1) == [5, 11]


@pytest.mark.parametrize("widths", [(1,), (2,), (1, 1), (1, 3), (2, 1, 1)])
@pytest.mark.parametrize("tensor", [1, 2, 4])
def test_tensor_groups_partition_each_stage_group_for_large_worlds(widths, tensor):
    size = sum(widths) * tensor
    for bundles in (1, 3, 4096 // size):
        lay = Layout(size * bundles, widths, tensor)
        for r in range(0, lay.world_size, max(1, lay.world_size // 97)):
            c = lay.coord(r)
            assert lay.rank_of(c.bundle, c.stage, c.replica, c.tensor) == r
            tg = lay.tensor_members(c.bundle, c.stage, c.replica)
            rg = lay.row_members(c.bundle, c.stage, c.tensor)
            assert set(tg) & set(rg) == {r}
            stage = lay.stage_members(c.bundle, c.stage)
            assert sorted(x for t in range(tensor) for x in lay.row_members(c.bundle, c.stage, t)) \
                == sorted(stage) == sorted(x for q in range(widths[c.stage])
                                           for x in lay.tensor_members(c.bundle, c.stage, q))
        groups = lay.all_data_groups()
        assert sorted(r for g in groups for r in g) == list(range(lay.world_size))


def test_tensor_layout_error_names_the_tensor_size():
    with pytest.raises(LayoutError) as e:
        Layout(6, (1, 1), tensor=2)
    msg = str(e.value)
    assert "bundle size 4" in msg and "x tensor 2" in msg and "-np 4" in msg
    with pytest.raises(LayoutError, match="--tensor"):
        Layout(4, (1,), tensor=0)
