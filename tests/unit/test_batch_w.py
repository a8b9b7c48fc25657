"""Batched W in the schedule language: ``2W0-3`` actions, the plan transform, its proof, the knob."""

from __future__ import annotations

import pytest

from hvdhybrid.config import ConfigError, PipelineConfig
from hvdhybrid.layout.placement import Placement
from hvdhybrid.parallel.graph import StageGraph
from hvdhybrid.pipeline import schedules
from hvdhybrid.pipeline.actions import Action, ScheduleError, depends_on
from hvdhybrid.pipeline.timeline import peak_held
from hvdhybrid.training.memory_plan import activations_peak


def test_a_batched_w_prints_parses_and_waits_for_each_b() -> None:
    a = Action(1, "W", 4, 0, 3)
    assert str(a) == "1W4-6" and Action.parse("1W4-6") == a
    assert list(a.mbs) == [4, 5, 6]
    assert depends_on(StageGraph.chain(2), a) == [Action(1, "B", m) for m in (4, 5, 6)]
    with pytest.raises(ScheduleError, match="only a W spans"):
        Action(1, "B", 0, 0, 2)
    with pytest.raises(ScheduleError, match="runs backwards"):
        Action.parse("1W4-2")


@pytest.mark.parametrize("name,v", [("zb1", 1), ("zbv", 2), ("vhalf", 2)])
@pytest.mark.parametrize("per", [2, 3, 8])
def test_batching_keeps_every_w_once_and_moves_none_earlier(name: str, v: int, per: int) -> None:
    p, m = 2, 8
    graph = StageGraph.chain(p * v)
    placement = None if v == 1 else Placement.v(p * v, p)
    plain = schedules.build(name, graph, m, placement)
    batched = schedules.build(name, graph, m, placement, batch_w=per)  # proven by the simulator
    for pos, acts in batched.items():
        ws = [a for a in acts if a.kind == "W"]
        for s in {a.stage for a in ws}:
            mine = [a for a in ws if a.stage == s]
            assert [j for a in mine for j in a.mbs] == list(range(m))  # each once, in order
            assert [a.n for a in mine] == [min(per, m - k) for k in range(0, m, per)]
        # the non-W actions keep their order, and each batch sits where its last W was
        assert [a for a in acts if a.kind != "W"] == [a for a in plain[pos] if a.kind != "W"]
        for a in ws:
            last = Action(a.stage, "W", a.mb + a.n - 1)
            before = [b for b in plain[pos][:plain[pos].index(last)] if b.kind != "W"]
            assert [b for b in acts[:acts.index(a)] if b.kind != "W"] == before


def test_held_activations_count_a_batch_as_its_microbatches() -> None:
    graph = StageGraph.chain(2)
    plan = schedules.build("zb1", graph, 4, batch_w=4)
    assert [str(a) for a in plan[0] if a.kind == "W"] == ["0W0-3"]
    assert peak_held(plan[0]) == 4  # all four wait for the one W at the end
    assert activations_peak(plan[0], {0: 10, 1: 10}) == 40
    assert peak_held(schedules.build("zb1", graph, 4)[0]) < 4


def test_sliced_and_fused_plans_are_left_as_they_are() -> None:
    graph = StageGraph.chain(2)
    sliced = schedules.build("zb1", graph, 4, slices=2, batch_w=4)
    assert sliced == schedules.build("zb1", graph, 4, slices=2)
    assert schedules.build("1f1b", graph, 4, batch_w=4) == schedules.build("1f1b", graph, 4)
    with pytest.raises(ScheduleError, match="at least one"):
        schedules.batch_weights(sliced, 0)


def test_the_knob_resolves_auto_and_refuses_what_cannot_batch() -> None:
    assert PipelineConfig(schedule="zb1", microbatches=8).weights_per_w() == 8
    assert PipelineConfig(schedule="1f1b", microbatches=8).weights_per_w() == 1
    assert PipelineConfig(schedule="zb1", microbatches=8, slices=(4, 4)).weights_per_w() == 1
    assert PipelineConfig(schedule="zbv", microbatches=8).weights_per_w() == 1
    assert PipelineConfig(schedule="zbv", microbatches=8, batch_w=4).weights_per_w() == 4
    with pytest.raises(ConfigError, match="--batch-w 4: schedule 1f1b computes"):
        PipelineConfig(schedule="1f1b", batch_w=4)
    with pytest.raises(ConfigError, match="token slices"):
        PipelineConfig(schedule="zb1", batch_w=4, slices=(4, 4))
    with pytest.raises(ConfigError, match="--batch-w must be >= 0"):
        PipelineConfig(batch_w=-1)
