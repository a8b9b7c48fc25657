"""Interleaved 1F1B, ZB-V and V-Half: complete, deadlock-free, and as long as their formulas say."""

from __future__ import annotations

import pytest

from hvdhybrid.config import Config
from hvdhybrid.layout.placement import Placement, PlacementError
from hvdhybrid.layout.topology import Layout
from hvdhybrid.parallel.graph import StageGraph
from hvdhybrid.pipeline.actions import Action, ScheduleError
from hvdhybrid.pipeline.schedules import NAMES, build, simulate
from hvdhybrid.pipeline.virtual import v_cap


def ticks(name: str, n: int, p: int, m: int, placement: Placement, slices: int = 1) -> int:
    g = StageGraph.chain(n)
    return len(simulate(g, placement, build(name, g, m, placement, slices), m, slices=slices).timeline)


def held_peak(plan: dict[int, list[Action]]) -> int:
    """Most stage-microbatches any position holds activations for, from F to W (or B when fused)."""
    split = any(a.kind == "W" for acts in plan.values() for a in acts)
    worst = 0
    for acts in plan.values():
        live = 0
        for a in acts:
            live += a.kind == "F"
            live -= a.kind == ("W" if split else "B")
            worst = max(worst, live)
    return worst


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("v", [1, 2, 3])
def test_interleaved_takes_2vm_plus_2p_minus_2_ticks(p: int, v: int) -> None:
    """Bubble (P-1)/(VM) of the work: 2(P-1) unit ticks however many virtual stages (M a multiple of P);
    any M is complete and deadlock-free (the simulator proves it inside build)."""
    for m in range(1, 4 * p + 1):
        t = ticks("interleaved", v * p, p, m, Placement.looped(v * p, p))
        if m % p == 0:
            assert t == 2 * v * m + 2 * (p - 1), (p, v, m, t)
        assert t >= 2 * v * m + 2 * (p - 1)


def test_interleaved_beats_1f1b_on_the_same_looped_stages() -> None:
    p, v, m = 4, 2, 8
    pl = Placement.looped(v * p, p)
    assert ticks("interleaved", v * p, p, m, pl) == 38 < ticks("1f1b", v * p, p, m, pl) == 40


@pytest.mark.parametrize("p", [2, 3, 4])
def test_zbv_has_zero_bubble_at_1f1bs_memory(p: int) -> None:
    """6M units of work per position, plus the P-1 ticks the last position waits for its first input:
    the least any schedule can take; at most 2P stage-microbatches (P whole ones, as 1F1B) held."""
    g = StageGraph.chain(2 * p)
    for m in range(2 * p, 4 * p + 1):
        plan = build("zbv", g, m, Placement.v(2 * p, p))
        assert len(simulate(g, Placement.v(2 * p, p), plan, m).timeline) == 6 * m + p - 1, (p, m)
        assert held_peak(plan) <= 2 * p == v_cap("zbv", p)
    for m in range(1, 2 * p):  # fewer microbatches: still complete and deadlock-free
        assert ticks("zbv", 2 * p, p, m, Placement.v(2 * p, p)) >= 6 * m + p - 1


@pytest.mark.parametrize("p", [2, 3, 4])
def test_vhalf_holds_p_plus_1_stage_microbatches(p: int) -> None:
    """V-Half: at most P+1 stage-microbatches of activations (1F1B: 2P), every size complete."""
    g = StageGraph.chain(2 * p)
    for m in range(1, 3 * p + 1):
        plan = build("vhalf", g, m, Placement.v(2 * p, p))
        assert held_peak(plan) <= p + 1
        assert len(simulate(g, Placement.v(2 * p, p), plan, m).timeline) >= 6 * m + p - 1


def test_vhalf_against_zbv_and_zb1_at_4_positions() -> None:
    """The price of the memory: ticks for 8 microbatches on 4 positions (unit costs)."""
    p, m = 4, 8
    zbv, vhalf = ticks("zbv", 8, p, m, Placement.v(8, p)), ticks("vhalf", 8, p, m, Placement.v(8, p))
    zb1_looped = ticks("zb1", 8, p, m, Placement.looped(8, p))
    assert zbv == 6 * m + p - 1 == 51
    assert (zbv, vhalf, zb1_looped) == (51, 58, 52)
    assert held_peak(build("vhalf", StageGraph.chain(8), m, Placement.v(8, p))) == 5
    assert held_peak(build("zb1", StageGraph.chain(8), m, Placement.looped(8, p))) > 5


def test_token_slices_apply_to_every_new_schedule() -> None:
    for name, pl in (("interleaved", Placement.looped(4, 2)), ("zbv", Placement.v(4, 2)),
                     ("vhalf", Placement.v(4, 2))):
        assert ticks(name, 4, 2, 4, pl, slices=3) > 0


@pytest.mark.parametrize("name, placement, message", [
    ("interleaved", Placement.contiguous(4, 2), "use --placement looped"),
    ("zbv", Placement.looped(4, 2), "use --placement v"),
    ("vhalf", Placement.looped(6, 2), "use --stages-per-rank 2"),
])
def test_a_placement_the_schedule_cannot_run_is_refused_in_one_line(name, placement, message) -> None:
    n = len(placement.positions)
    with pytest.raises(ScheduleError, match=message) as e:
        build(name, StageGraph.chain(n), 4, placement)
    assert "\n" not in str(e.value)


def test_a_branching_graph_is_refused() -> None:
    g = StageGraph(3, ((0, 2), (1, 2)))
    with pytest.raises(ScheduleError, match="stages branch"):
        build("interleaved", g, 2, Placement.identity(3))


def test_v_placement_and_auto() -> None:
    assert Placement.v(6, 3).positions == (0, 1, 2, 2, 1, 0)
    assert Placement.parse("v", 4, 2).positions == (0, 1, 1, 0)
    with pytest.raises(PlacementError, match="2 stages per position"):
        Placement.v(6, 2)
    lay = Layout(2, (1, 1))
    cfg = Config.from_flat(stages=2, stages_per_rank=2, schedule="zbv")
    assert cfg.parallel.placement_for(lay, cfg.pipeline.schedule) == Placement.v(4, 2)
    assert cfg.parallel.placement_for(lay, "1f1b") == Placement.looped(4, 2)
    assert {"interleaved", "zbv", "vhalf", "gpipe", "1f1b", "zb1"} == set(NAMES)
