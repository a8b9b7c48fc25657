"""StageGraph: chains, fork/join graphs, depths and the errors for unrunnable graphs."""

import pytest

from hvdhybrid.parallel.graph import GraphError, StageGraph


def test_chain():
    g = StageGraph.chain(4)
    assert g.edges == ((0, 1), (1, 2), (2, 3))
    assert g.batch_stages == frozenset({0})
    assert g.sink == 3 and g.is_chain()
    assert [g.depth(s) for s in range(4)] == [3, 2, 1, 0]
    assert g.upstream(2) == [1] and g.downstream(2) == [3]
    assert g.edge_index(2, 3) == 2


def test_single_stage():
    g = StageGraph.chain(1)
    assert g.edges == () and g.sink == 0 and g.depth(0) == 0
    assert g.batch_stages == frozenset({0}) and g.is_chain()


def test_fork_join():
    g = StageGraph(3, ((0, 2), (1, 2)))
    assert g.batch_stages == frozenset({0, 1})
    assert g.sink == 2
    assert [g.depth(s) for s in range(3)] == [1, 1, 0]
    assert g.upstream(2) == [0, 1]
    assert not g.is_chain()


def test_uneven_join_depth():
    g = StageGraph(4, ((0, 1), (1, 3), (2, 3)))
    assert [g.depth(s) for s in range(4)] == [2, 1, 1, 0]
    assert g.batch_stages == frozenset({0, 2})


def test_explicit_batch_stages_kept():
    g = StageGraph(2, ((0, 1),), frozenset({0, 1}))
    assert g.batch_stages == frozenset({0, 1})


@pytest.mark.parametrize("k, edges, match", [
    (2, ((1, 0),), "lower to a higher"),            # backward edge
    (2, ((0, 1), (1, 0)), "lower to a higher"),     # a cycle needs a backward edge
    (2, ((1, 1),), "lower to a higher"),            # self loop
    (2, ((0, 2),), "invalid for 2 stages"),         # out of range
    (3, ((0, 2),), "exactly one sink"),             # stage 1 dangles
    (2, (), "exactly one sink"),
    (2, ((0, 1), (0, 1)), "twice"),
    (0, (), "at least one stage"),
])
def test_errors(k, edges, match):
    with pytest.raises(GraphError, match=match):
        StageGraph(k, edges)


def test_source_without_batch_input():
    with pytest.raises(GraphError, match="no upstream edge and no batch input"):
        StageGraph(3, ((0, 2), (1, 2)), frozenset({0}))
