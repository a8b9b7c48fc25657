"""Pipeline schedules: golden action lists, merging onto placements, simulator proofs, makespan and memory."""

import pytest

from hvdhybrid.layout.placement import Placement, PlacementError
from hvdhybrid.parallel.graph import StageGraph
from hvdhybrid.pipeline.schedules import (
    SCHEDULES,
    Action,
    ScheduleError,
    build,
    build_forward_only,
    forward_only,
    gpipe,
    merge,
    one_f_one_b,
    simulate,
    zero_bubble,
)


def acts(text):
    """'0F0 0B0' -> [Action(0, 'F', 0), Action(0, 'B', 0)]."""
    return [Action.parse(t) for t in text.split()]


def names(actions):
    return " ".join(map(str, actions))


def ident(k):
    return Placement.identity(k)


FORK_JOINS = [
    StageGraph(3, ((0, 2), (1, 2))),
    StageGraph(4, ((0, 1), (1, 3), (2, 3))),
    StageGraph(4, ((0, 1), (0, 2), (1, 3), (2, 3))),
    StageGraph(4, ((0, 1), (1, 2), (0, 3), (2, 3))),
    StageGraph(5, ((0, 2), (1, 2), (2, 4), (3, 4))),
]

FOUR_ON_TWO = [Placement.looped(4, 2), Placement.contiguous(4, 2)]


def B2(a):
    """A fused backward costs two forwards."""
    return 2.0 if a.kind == "B" else 1.0


# -- actions ---------------------------------------------------------------------------------


def test_action_prints_and_parses():
    a = Action(2, "F", 0)
    assert str(a) == "2F0"
    assert Action.parse("2F0") == a and Action.parse(" 12W31 ") == Action(12, "W", 31)
    for text in ("0F0", "3B7", "1W2", "10F11"):
        assert str(Action.parse(text)) == text
    assert sorted(acts("1F0 0B1 0F1 0F0")) == acts("0B1 0F0 0F1 1F0")  # by stage, kind, microbatch


@pytest.mark.parametrize("text", ["F0", "2X0", "2F", "a2F0", "2F0 1F0", "-1F0", ""])
def test_action_parse_errors(text):
    with pytest.raises(ScheduleError, match="cannot read action.*e.g. '2F0'"):
        Action.parse(text)


def test_action_kind_checked():
    with pytest.raises(ScheduleError, match="'F', 'B', 'W' or 'R', got 'X'"):
        Action(0, "X", 0)


# -- per-stage lists ---------------------------------------------------------------------------


def test_golden_1f1b_two_stages():
    g = StageGraph.chain(2)
    assert names(one_f_one_b(g, 0, 4)) == "0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3"
    assert names(one_f_one_b(g, 1, 4)) == "1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3"
    plan = build("1f1b", g, 4)
    assert names(plan[0]) == "0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3"
    assert names(plan[1]) == "1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3"


def test_golden_1f1b_three_stages():
    g = StageGraph.chain(3)
    assert names(one_f_one_b(g, 0, 4)) == "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3"
    assert names(one_f_one_b(g, 1, 4)) == "1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3"
    assert names(one_f_one_b(g, 0, 2)) == "0F0 0F1 0B0 0B1"  # warm-up capped at M


def test_golden_gpipe_and_forward_only():
    g = StageGraph.chain(2)
    assert names(gpipe(g, 0, 3)) == "0F0 0F1 0F2 0B0 0B1 0B2"
    assert names(gpipe(g, 1, 3)) == "1F0 1F1 1F2 1B0 1B1 1B2"
    assert names(forward_only(g, 1, 3)) == "1F0 1F1 1F2"


def test_golden_zero_bubble():
    g = StageGraph.chain(2)
    # the first stage runs W right after B; the sink defers it by one microbatch
    assert names(zero_bubble(g, 0, 4)) == "0F0 0F1 0B0 0W0 0F2 0B1 0W1 0F3 0B2 0W2 0B3 0W3"
    assert names(zero_bubble(g, 1, 4)) == "1F0 1B0 1F1 1B1 1W0 1F2 1B2 1W1 1F3 1B3 1W2 1W3"
    assert names(zero_bubble(StageGraph.chain(1), 0, 2)) == "0F0 0B0 0W0 0F1 0B1 0W1"


def test_schedules_registry():
    assert SCHEDULES == {"gpipe": gpipe, "1f1b": one_f_one_b, "zb1": zero_bubble}


# -- timelines and makespans (identity placement) -------------------------------------------


def test_golden_gpipe_timeline():
    g = StageGraph.chain(2)
    plan = build("gpipe", g, 2)
    r = simulate(g, ident(2), plan, 2)
    assert r.timeline == [
        ["0F0", ""], ["0F1", "1F0"], ["", "1F1"], ["", "1B0"], ["0B0", "1B1"], ["0B1", ""]]
    assert r.makespan == 6


def test_golden_1f1b_timeline_and_makespan():
    # 2 stages, 4 microbatches, unit costs: 8 actions per position plus one bubble
    # tick at each end of the step (the other position's F0 / B3): 2 * (M + P - 1) = 10.
    g = StageGraph.chain(2)
    r = simulate(g, ident(2), build("1f1b", g, 4), 4)
    assert [" ".join(row[p] or "." for row in r.timeline) for p in range(2)] == [
        "0F0 0F1 . 0B0 0F2 0B1 0F3 0B2 . 0B3",
        ". 1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3 ."]
    assert r.makespan == 10 == len(r.timeline)


def test_makespan_with_per_kind_costs_and_comm():
    # 1F1B, 2 stages, 2 microbatches, F = 1, B = 2:
    #   position 0: 0F0 [0,1] 0F1 [1,2]            0B0 [4,6]    0B1 [7,9]
    #   position 1:           1F0 [1,2] 1B0 [2,4]  1F1 [4,5]    1B1 [5,7]
    g = StageGraph.chain(2)
    plan = build("1f1b", g, 2)
    r = simulate(g, ident(2), plan, 2, costs=B2)
    assert r.makespan == 9 == 3 * (2 + 2 - 1)
    assert {str(a): t for a, t in r.finish.items()} == {
        "0F0": 1, "0F1": 2, "1F0": 2, "1B0": 4, "1F1": 5, "1B1": 7, "0B0": 6, "0B1": 9}
    # half a tick per transfer: 1F0 [1.5,2.5] 1B0 [2.5,4.5] 1F1 [4.5,5.5] 1B1 [5.5,7.5]
    # 0B0 [5,7] (1B0 + 0.5) and 0B1 [8,10]
    r = simulate(g, ident(2), plan, 2, costs=B2, comm=0.5)
    assert r.makespan == 10
    assert r.finish[Action(1, "F", 0)] == 2.5 and r.finish[Action(0, "B", 0)] == 7
    assert r.timeline == simulate(g, ident(2), plan, 2).timeline  # the drawing is always unit-cost


def test_comm_only_across_positions():
    g = StageGraph.chain(2)
    one = Placement((0, 0))
    plan = build("gpipe", g, 1, one)
    assert names(plan[0]) == "0F0 1F0 1B0 0B0"
    assert simulate(g, one, plan, 1, comm=5.0).makespan == 4
    assert simulate(g, ident(2), build("gpipe", g, 1), 1, comm=5.0).makespan == 4 + 2 * 5  # 0->1, 1->0


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_unit_makespan_is_timeline_length_and_finish_is_tick(name):
    for g in [StageGraph.chain(3)] + FORK_JOINS[:2]:
        for pl in {ident(g.num_stages), Placement.looped(g.num_stages, 2),
                   Placement.contiguous(g.num_stages, 2)}:
            r = simulate(g, pl, build(name, g, 5, pl), 5)
            assert r.makespan == len(r.timeline)
            for t, row in enumerate(r.timeline):
                for text in filter(None, row):
                    assert r.finish[Action.parse(text)] == t + 1


def test_zero_bubble_beats_1f1b():
    # F = B = W = 1 tick against a fused B of 2: ZB-H1 takes 3M + P - 1, 1F1B 3(M + P - 1).
    for k in (2, 3, 4, 6):
        g = StageGraph.chain(k)
        for m in range(k, 13):
            zb = simulate(g, ident(k), build("zb1", g, m), m).makespan
            fused = simulate(g, ident(k), build("1f1b", g, m), m, costs=B2).makespan
            assert (zb, fused) == (3 * m + k - 1, 3 * (m + k - 1))


# -- deadlock freedom ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb1"])
def test_chains_deadlock_free(name):
    per_mb = 3 if name == "zb1" else 2
    for k in range(1, 7):
        g = StageGraph.chain(k)
        for m in range(1, 13):
            plan = build(name, g, m)  # build() runs simulate(), which raises on deadlock
            timeline = simulate(g, ident(k), plan, m).timeline
            ran = sorted((s, a) for row in timeline for s, a in enumerate(row) if a)
            assert len(ran) == per_mb * k * m
            if name == "gpipe":
                assert len(timeline) == 2 * (m + k - 1)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb1"])
@pytest.mark.parametrize("graph", FORK_JOINS, ids=lambda g: str(g.edges))
def test_fork_join_deadlock_free(name, graph):
    k = graph.num_stages
    for m in range(1, 9):
        build(name, graph, m)
        for pl in (Placement.looped(k, 2), Placement.contiguous(k, 2)):
            build(name, graph, m, pl)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb1"])
@pytest.mark.parametrize("placement", FOUR_ON_TWO, ids=lambda p: p.describe())
def test_four_stages_on_two_positions(name, placement):
    g = StageGraph.chain(4)
    for m in range(1, 9):
        plan = build(name, g, m, placement)
        assert sorted(plan) == [0, 1]
        r = simulate(g, placement, plan, m)
        per_stage = {s: SCHEDULES[name](g, s, m) for s in range(4)}
        for p, actions in plan.items():
            assert {a.stage for a in actions} == set(placement.stages_on(p))
            for s in placement.stages_on(p):  # merging keeps every stage's own order
                assert [a for a in actions if a.stage == s] == per_stage[s]
        assert len(r.finish) == sum(map(len, plan.values()))


def test_golden_looped_1f1b():
    # the drawing in the schedule module's docstring
    g, pl = StageGraph.chain(4), Placement.looped(4, 2)
    r = simulate(g, pl, build("1f1b", g, 4, pl), 4)
    assert [" ".join(f"{row[p] or '.':>3}" for row in r.timeline) for p in range(2)] == [
        "0F0 0F1 2F0 2F1 0F2 2B0 0F3   . 2F2 0B0 2B1   . 2F3 0B1 2B2 2B3 0B2 0B3",
        "  . 1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 3F2 3B2 1F3 1B1 3F3 3B3 1B2 1B3   ."]
    assert r.makespan == 18
    pc = Placement.contiguous(4, 2)
    assert simulate(g, pc, build("1f1b", g, 4, pc), 4).makespan == 20


def test_forward_only_simulation():
    g = FORK_JOINS[1]
    plan = {s: forward_only(g, s, 3) for s in range(4)}
    assert len(simulate(g, ident(4), plan, 3, forward_only=True).timeline) == 3 + g.depth(0)
    assert build_forward_only(g, 3) == plan
    pl = Placement.looped(4, 2)
    plan = build_forward_only(g, 3, pl)
    assert sorted(a for acts_ in plan.values() for a in acts_) == sorted(
        Action(s, "F", m) for s in range(4) for m in range(3))
    with pytest.raises(ScheduleError, match="exactly once"):  # a training plan is not an evaluation plan
        simulate(g, ident(4), build("gpipe", g, 3), 3, forward_only=True)


# -- merge -------------------------------------------------------------------------------------


def test_merge_identity_keeps_lists():
    g = StageGraph.chain(3)
    per_stage = {s: one_f_one_b(g, s, 5) for s in range(3)}
    assert merge(g, ident(3), per_stage, 5) == per_stage


def test_merge_tie_break():
    g, one = StageGraph.chain(2), Placement((0, 0))
    per = {s: gpipe(g, s, 2) for s in range(2)}
    # tick 1: 0F1 and 1F0 are ready; the older microbatch goes first
    assert names(merge(g, one, per, 2)[0]) == "0F0 1F0 0F1 1F1 1B0 0B0 1B1 0B1"
    per = {s: zero_bubble(g, s, 2) for s in range(2)}
    # 0B0 (older) before 1F1; then 1F1 and 1B1 before the ready 0W0, since W is filler;
    # of two ready W of one microbatch, the later stage's first
    assert names(merge(g, one, per, 2)[0]) == "0F0 1F0 1B0 0F1 0B0 1F1 1B1 1W0 0W0 0B1 1W1 0W1"


def test_merge_errors():
    g = StageGraph.chain(2)
    with pytest.raises(ScheduleError, match="list of stage 0 holds actions of other stages: 1F0"):
        merge(g, ident(2), {0: acts("0F0 1F0"), 1: acts("1F0")}, 1, forward_only=True)
    with pytest.raises(ScheduleError, match=r"lists for stages \[2\]"):
        merge(g, ident(2), {0: acts("0F0"), 1: acts("1F0"), 2: acts("2F0")}, 1, forward_only=True)
    with pytest.raises(ScheduleError, match="stage 1: actions 1F0 are not each F and B"):
        merge(g, ident(2), {0: gpipe(g, 0, 1), 1: acts("1F0")}, 1)
    with pytest.raises(ScheduleError, match=r"lists deadlock: position 0 at 0B0 waits for 1B0 \(later on "
                                            r"position 0 itself\); position 0 at 1B0 waits for 1F0"):
        merge(g, Placement((0, 0)), {0: acts("0F0 0B0"), 1: acts("1B0 1F0")}, 1)
    with pytest.raises(PlacementError, match="covers 3 stages but the stage graph has 2"):
        merge(g, ident(3), {s: gpipe(g, s, 1) for s in range(2)}, 1)


# -- plans the simulator rejects ------------------------------------------------------------------


@pytest.mark.parametrize("plan, match", [
    # stage 1 backward before its forward
    ({0: acts("0F0 0F1 0B0 0B1"), 1: acts("1B0 1F0 1F1 1B1")},
     r"position 0 at 0B0 waits for 1B0 \(on position 1\); "
     r"position 1 at 1B0 waits for 1F0 \(later on position 1 itself\)"),
    # 0 waits for B0, 1 waits for F1
    ({0: acts("0F0 0B0 0F1 0B1"), 1: acts("1F0 1F1 1B0 1B1")},
     r"position 0 at 0B0 waits for 1B0 \(on position 1\); position 1 at 1F1 waits for 0F1 \(on position 0\)"),
])
def test_deadlock_detected(plan, match):
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(StageGraph.chain(2), ident(2), plan, 2)
    with pytest.raises(ScheduleError, match=match):
        simulate(StageGraph.chain(2), ident(2), plan, 2)


def test_deadlock_detected_on_shared_position():
    # stage 2 cannot run before stage 0 of the same microbatch, and both are on position 0
    g, pl = StageGraph.chain(4), Placement.looped(4, 2)
    plan = {0: acts("2F0 0F0 2B0 0B0"), 1: acts("1F0 3F0 3B0 1B0")}
    with pytest.raises(ScheduleError, match=r"deadlocks: position 0 at 2F0 waits for 1F0 \(on position 1\); "
                                            r"position 1 at 1F0 waits for 0F0 \(on position 0\)"):
        simulate(g, pl, plan, 1)
    simulate(g, pl, {0: acts("0F0 2F0 2B0 0B0"), 1: plan[1]}, 1)  # the order fixed


def test_weight_gradient_before_its_backward():
    g = StageGraph.chain(2)
    plan = {0: acts("0F0 0B0 0W0"), 1: acts("1F0 1W0 1B0")}
    with pytest.raises(ScheduleError, match=r"1W0 waits for 1B0 \(later on position 1 itself\)"):
        simulate(g, ident(2), plan, 1)
    simulate(g, ident(2), {0: plan[0], 1: acts("1F0 1B0 1W0")}, 1)
    simulate(g, ident(2), {0: plan[0], 1: acts("1F0 1B0")}, 1)  # W per stage: all or none


@pytest.mark.parametrize("plan", [
    {0: acts("0F0 0F1 0B0"), 1: acts("1F0 1F1 1B0 1B1")},              # missing B1
    {0: acts("0F0 0F1 0B0 0B1 0B1"), 1: acts("1F0 1F1 1B0 1B1")},      # duplicate
    {0: acts("0F0 0F1 0B0 0B1")},                                      # position 1 absent
    {0: acts("0F0 0F1 0B0 0B1 0W0"), 1: acts("1F0 1F1 1B0 1B1")},      # W of one microbatch only
    {0: acts("0F0 0F1 0B0 0B1 0F2"), 1: acts("1F0 1F1 1B0 1B1")},      # microbatch 2 of 2
])
def test_incomplete_plan_detected(plan):
    with pytest.raises(ScheduleError, match="exactly once"):
        simulate(StageGraph.chain(2), ident(2), plan, 2)


def test_action_on_wrong_position():
    g, pl = StageGraph.chain(4), Placement.looped(4, 2)
    plan = build("gpipe", g, 2, pl)
    plan[0], plan[1] = plan[0] + [plan[1][0]], plan[1][1:]
    with pytest.raises(ScheduleError, match="action 1F0 is in the list of position 0, but the placement "
                                            "runs stage 1 on position 1"):
        simulate(g, pl, plan, 2)


def test_plan_shape_errors():
    g = StageGraph.chain(2)
    plan = build("gpipe", g, 1)
    with pytest.raises(ScheduleError, match=r"lists for positions \[2\], but the placement has 2"):
        simulate(g, ident(2), {**plan, 2: []}, 1)
    with pytest.raises(ScheduleError, match="action 5F0 on position 1 names stage 5"):
        simulate(g, ident(2), {0: plan[0], 1: plan[1] + acts("5F0")}, 1)
    with pytest.raises(PlacementError, match="covers 4 stages but the stage graph has 2"):
        simulate(g, Placement.looped(4, 2), plan, 1)


def test_unknown_schedule():
    with pytest.raises(ScheduleError, match="unknown schedule 'zigzag'; choose one of gpipe, 1f1b, zb1"):
        build("zigzag", StageGraph.chain(2), 2)


def test_no_microbatches():
    with pytest.raises(ScheduleError, match="at least one microbatch, got 0"):
        build("1f1b", StageGraph.chain(2), 0)
    with pytest.raises(ScheduleError, match="at least one microbatch"):
        build_forward_only(StageGraph.chain(2), 0)


def test_build_checks_placement():
    with pytest.raises(PlacementError, match="covers 2 stages but the stage graph has 4"):
        build("1f1b", StageGraph.chain(4), 2, Placement.identity(2))


# -- memory --------------------------------------------------------------------------------------


def _peak(actions, opens, closes):
    live = peak = 0
    for a in actions:
        live += (a.kind == opens) - (a.kind == closes)
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("graph", [StageGraph.chain(k) for k in (1, 2, 4, 6)] + FORK_JOINS,
                         ids=lambda g: str(g.edges))
def test_memory_bound(graph):
    deepest = max(graph.depth(s) for s in range(graph.num_stages))
    for m in (1, 3, 8, 12):
        for s in range(graph.num_stages):
            bound = min(graph.depth(s) + 1, m)
            assert _peak(one_f_one_b(graph, s, m), "F", "B") == bound
            assert _peak(gpipe(graph, s, m), "F", "B") == m
            zb = zero_bubble(graph, s, m)
            assert _peak(zb, "F", "B") == bound  # as many activations as 1F1B
            assert _peak(zb, "B", "W") <= deepest - graph.depth(s) + 1


@pytest.mark.parametrize("name", ["1f1b", "zb1"])
@pytest.mark.parametrize("placement", FOUR_ON_TWO, ids=lambda p: p.describe())
def test_memory_bound_after_merge(name, placement):
    g = StageGraph.chain(4)
    for m in (1, 3, 8):
        plan = build(name, g, m, placement)
        for s in range(4):
            mine = [a for a in plan[placement.position_of(s)] if a.stage == s]
            assert _peak(mine, "F", "B") == min(g.depth(s) + 1, m)
