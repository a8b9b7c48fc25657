"""Pipeline schedules: golden action lists, simulator proofs, makespan and memory bounds."""

import pytest

from hvdhybrid.graph import StageGraph
from hvdhybrid.schedule import (
    Action,
    ScheduleError,
    build,
    forward_only,
    gpipe,
    one_f_one_b,
    simulate,
)


def acts(text):
    """'F0 B0' -> [Action('F', 0), Action('B', 0)]."""
    return [Action(t[0], int(t[1:])) for t in text.split()]


def names(actions):
    return " ".join(map(str, actions))


FORK_JOINS = [
    StageGraph(3, ((0, 2), (1, 2))),
    StageGraph(4, ((0, 1), (1, 3), (2, 3))),
    StageGraph(4, ((0, 1), (0, 2), (1, 3), (2, 3))),
    StageGraph(4, ((0, 1), (1, 2), (0, 3), (2, 3))),
    StageGraph(5, ((0, 2), (1, 2), (2, 4), (3, 4))),
]


def test_golden_1f1b_two_stages():
    g = StageGraph.chain(2)
    assert names(one_f_one_b(g, 0, 4)) == "F0 F1 B0 F2 B1 F3 B2 B3"
    assert names(one_f_one_b(g, 1, 4)) == "F0 B0 F1 B1 F2 B2 F3 B3"


def test_golden_1f1b_three_stages():
    g = StageGraph.chain(3)
    assert names(one_f_one_b(g, 0, 4)) == "F0 F1 F2 B0 F3 B1 B2 B3"
    assert names(one_f_one_b(g, 1, 4)) == "F0 F1 B0 F2 B1 F3 B2 B3"
    assert names(one_f_one_b(g, 0, 2)) == "F0 F1 B0 B1"  # warm-up capped at M


def test_golden_gpipe_and_forward_only():
    g = StageGraph.chain(2)
    assert names(gpipe(g, 0, 3)) == "F0 F1 F2 B0 B1 B2"
    assert names(gpipe(g, 1, 3)) == "F0 F1 F2 B0 B1 B2"
    assert names(forward_only(g, 1, 3)) == "F0 F1 F2"


def test_golden_gpipe_timeline():
    plan = build("gpipe", StageGraph.chain(2), 2)
    assert simulate(StageGraph.chain(2), plan, 2) == [
        ["F0", ""], ["F1", "F0"], ["", "F1"], ["", "B0"], ["B0", "B1"], ["B1", ""]]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_chains_deadlock_free(name):
    for k in range(1, 7):
        g = StageGraph.chain(k)
        for m in range(1, 13):
            plan = build(name, g, m)  # build() runs simulate(), which raises on deadlock
            timeline = simulate(g, plan, m)
            ran = sorted((s, a) for row in timeline for s, a in enumerate(row) if a)
            assert len(ran) == 2 * k * m
            if name == "gpipe":
                assert len(timeline) == 2 * (m + k - 1)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("graph", FORK_JOINS, ids=lambda g: str(g.edges))
def test_fork_join_deadlock_free(name, graph):
    for m in range(1, 9):
        build(name, graph, m)


def test_forward_only_simulation():
    g = FORK_JOINS[1]
    plan = {s: forward_only(g, s, 3) for s in range(4)}
    assert len(simulate(g, plan, 3, forward_only=True)) == 3 + g.depth(0)


@pytest.mark.parametrize("plan", [
    {0: acts("F0 F1 B0 B1"), 1: acts("B0 F0 F1 B1")},   # stage 1 backward before its forward
    {0: acts("F0 B0 F1 B1"), 1: acts("F0 F1 B0 B1")},   # 0 waits for B0, 1 waits for F1
])
def test_deadlock_detected(plan):
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(StageGraph.chain(2), plan, 2)


@pytest.mark.parametrize("plan", [
    {0: acts("F0 F1 B0"), 1: acts("F0 F1 B0 B1")},          # missing B1
    {0: acts("F0 F1 B0 B1 B1"), 1: acts("F0 F1 B0 B1")},    # duplicate
    {0: acts("F0 F1 B0 B1")},                               # stage 1 absent
])
def test_incomplete_plan_detected(plan):
    with pytest.raises(ScheduleError, match="exactly once"):
        simulate(StageGraph.chain(2), plan, 2)


def test_unknown_schedule():
    with pytest.raises(ScheduleError, match="unknown schedule"):
        build("zigzag", StageGraph.chain(2), 2)


def _peak_in_flight(actions):
    live = peak = 0
    for a in actions:
        live += 1 if a.kind == "F" else -1
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("graph", [StageGraph.chain(k) for k in (1, 2, 4, 6)] + FORK_JOINS,
                         ids=lambda g: str(g.edges))
def test_memory_bound(graph):
    for m in (1, 3, 8, 12):
        for s in range(graph.num_stages):
            assert _peak_in_flight(one_f_one_b(graph, s, m)) == min(graph.depth(s) + 1, m)
            assert _peak_in_flight(gpipe(graph, s, m)) == m
