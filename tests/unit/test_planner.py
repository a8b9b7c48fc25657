"""The planner's pure parts: the layouts it weighs, the time model over measured costs, sizes, output."""

from __future__ import annotations

import pytest

from hvdhybrid.config import ConfigError
from hvdhybrid.layout.placement import Placement
from hvdhybrid.parallel.graph import StageGraph
from hvdhybrid.pipeline import schedules
from hvdhybrid.pipeline.simulator import simulate
from hvdhybrid.planner.links import Link
from hvdhybrid.planner.predict import Prediction, step_time
from hvdhybrid.planner.probe import StageTime
from hvdhybrid.planner.render import parse_bytes, render
from hvdhybrid.planner.space import Choice, choices


def test_choices_cover_the_world_and_split_the_rows() -> None:
    got = list(choices(4, 8, layers=8, tensor_ok=True, attention=False))
    assert got and len(set(got)) == len(got)
    for c in got:
        assert c.tensor * (sum(c.widths) if c.widths else c.stages) * c.bundles == 4
        assert 8 % (c.bundles * c.microbatches) == 0
        assert c.zero == 0 or c.bundles > 1
        assert c.recompute in ("none", "full")
        assert c.stages_per_rank == 1 or c.schedule in ("interleaved", "zbv", "vhalf")
    assert Choice(1, 1, 4, 1, "1f1b", 1, 0, "none") in got
    assert Choice(2, 2, 1, 2, "zbv", 4, 0, "full") in got
    assert not any(c.tensor > 1 for c in choices(4, 8, layers=8, tensor_ok=False, attention=True))
    assert any(c.recompute == "selective" for c in choices(2, 4, layers=2, tensor_ok=False, attention=True))
    assert not any(c.stages * c.stages_per_rank > 2 for c in choices(4, 8, layers=2, tensor_ok=False,
                                                                     attention=False))


def _times(f: float, b: float, out: int = 0) -> dict[int, StageTime]:
    return {0: StageTime(f, b, out), 1: StageTime(f, b, 0)}


def test_step_time_is_the_simulated_schedule_then_the_average_then_the_optimizer() -> None:
    g, pl = StageGraph.chain(2), Placement.identity(2)
    plan = schedules.build("1f1b", g, 4, pl)
    link = Link(0.0, 1e9)
    one = Choice(1, 2, 1, 1, "1f1b", 4, 0, "none")
    got = step_time(one, g, pl, plan, _times(1.0, 2.0), link, [10, 10], 0.0)
    assert got.pipeline == simulate(g, pl, plan, 4, costs=lambda a: {"F": 1.0, "B": 2.0}[a.kind]).makespan
    assert got.reduce == 0.0 and got.step == got.pipeline
    # 2 bundles: a ring all-reduce of fp16 gradients; --zero 1 adds the all-gather of the parameters
    two = Choice(1, 2, 2, 1, "1f1b", 4, 0, "none")
    g2 = step_time(two, g, pl, plan, _times(1.0, 2.0), link, [1000, 500], 1.0)
    assert g2.reduce == pytest.approx(2 * 1 * (2 * 1000 / 2) / 1e9)
    assert g2.optimizer == pytest.approx(1000.0)
    z1 = step_time(Choice(1, 2, 2, 1, "1f1b", 4, 1, "none"), g, pl, plan, _times(1.0, 2.0), link, [1000, 500],
                   1.0)
    assert z1.optimizer == pytest.approx(500.0) and z1.reduce > g2.reduce
    # what crosses stage groups costs the link's time per message; oversubscription scales the compute
    slow = step_time(one, g, pl, plan, _times(1.0, 2.0, out=10**9), link, [10, 10], 0.0)
    assert slow.pipeline > got.pipeline
    # a host's cores are shared by its busy ranks: 4 bundles of one stage on 2 cores take twice their
    # compute; 2 stages x 2 bundles on 2 cores take their critical path or their work over the cores
    dp = Choice(1, 1, 4, 1, "1f1b", 1, 0, "none")
    g1, p1 = StageGraph.chain(1), Placement.identity(1)
    flat = schedules.build("1f1b", g1, 1, p1)
    alone = step_time(dp, g1, p1, flat, {0: StageTime(1.0, 2.0, 0)}, link, [0], 0.0, per_host=2, cores=2)
    shared = step_time(dp, g1, p1, flat, {0: StageTime(1.0, 2.0, 0)}, link, [0], 0.0, per_host=4, cores=2)
    assert (alone.pipeline, shared.pipeline) == (pytest.approx(3.0), pytest.approx(6.0))
    piped = step_time(two, g, pl, plan, _times(1.0, 2.0), link, [0, 0], 0.0, per_host=4, cores=2)
    bundle_work = 2 * 4 * (1.0 + 2.0)  # 2 stage groups x 4 microbatches x (F + B)
    assert piped.pipeline == pytest.approx(max(got.pipeline, 2 * bundle_work / 2))  # 2 bundles, 2 cores


def test_a_split_w_costs_what_was_measured_and_tensor_collectives_count() -> None:
    g, pl = StageGraph.chain(2), Placement.identity(2)
    link = Link(1e-3, 1e9)
    c = Choice(1, 2, 1, 1, "zb1", 4, 0, "none")
    zb = step_time(c, g, pl, schedules.build("zb1", g, 4, pl), _times(1.0, 2.0), link, [1, 1], 0.0)
    assert zb.pipeline <= step_time(Choice(1, 2, 1, 1, "1f1b", 4, 0, "none"), g, pl,
                                    schedules.build("1f1b", g, 4, pl), _times(1.0, 2.0), link, [1, 1],
                                    0.0).pipeline
    # measured split costs replace the halves: a W that costs a whole backward (as under --recompute
    # full, where each of W's backwards recomputes the layers it reaches) makes the step longer
    zplan = schedules.build("zb1", g, 4, pl)
    costly = {s: StageTime(1.0, 2.0, 0, split_b=1.0, split_w=2.0) for s in (0, 1)}
    halves = {s: StageTime(1.0, 2.0, 0, split_b=1.0, split_w=1.0) for s in (0, 1)}
    assert step_time(c, g, pl, zplan, halves, link, [1, 1], 0.0).pipeline == pytest.approx(zb.pipeline)
    slow = step_time(c, g, pl, zplan, costly, link, [1, 1], 0.0).pipeline
    assert slow > zb.pipeline
    # on one rank nothing waits: the work is 4 x (F + B + W), the measured parts
    one_g, one_p = StageGraph.chain(1), Placement.identity(1)
    alone = step_time(Choice(1, 1, 1, 1, "zb1", 4, 0, "none"), one_g, one_p,
                      schedules.build("zb1", one_g, 4, one_p), {0: costly[0]}, link, [1], 0.0)
    assert alone.pipeline == pytest.approx(4 * (1.0 + 1.0 + 2.0))
    t2 = Choice(2, 2, 1, 1, "1f1b", 4, 0, "none")
    plan = schedules.build("1f1b", g, 4, pl)
    plain = step_time(t2, g, pl, plan, _times(1.0, 2.0), link, [1, 1], 0.0)
    talky = {s: StageTime(1.0, 2.0, 0, tensor_calls=4, tensor_bytes=4000) for s in (0, 1)}
    assert step_time(t2, g, pl, plan, talky, link, [1, 1], 0.0).pipeline > plain.pipeline


def test_link_collectives() -> None:
    link = Link(1.0, 10.0)
    assert link.time(0) == 0.0 and link.time(10) == 2.0
    assert link.allreduce(40, 4) == pytest.approx(6 * (1 + 1))
    assert link.allgather(40, 4) == pytest.approx(3 * 2)
    assert link.allreduce(40, 1) == 0.0


def test_sizes() -> None:
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1500MB") == 1500 * 10**6
    assert parse_bytes("3GiB") == 3 * 2**30
    assert parse_bytes("4096") == 4096
    for bad in ("lots", "2 parsecs", "-1GB", ""):
        with pytest.raises(ConfigError, match="is not a size"):
            parse_bytes(bad)


def test_render_names_the_choice_and_why() -> None:
    def row(c: Choice, t: float) -> dict:
        return {"choice": c, "options": c.options(), "describe": c.describe(), "step_s": t, "pipeline_s": t,
                "reduce_s": 0.0, "optimizer_s": 0.0, "memory": 2**20 * 100}
    best, dp = Choice(1, 2, 2, 1, "zb1", 4, 1, "none"), Choice(1, 1, 4, 1, "1f1b", 1, 0, "none")
    got = {"model": "mlp", "np": 4, "layouts": 10, "too_big": 2, "cores": 2, "ranks_per_host": 4,
           "link": {"latency": 1e-6, "bandwidth": 2e10}, "ranked": [row(best, 0.1), row(dp, 0.2)]}
    text = render(got)
    assert "chosen: --tensor 1 --stages 2 --schedule zb1 --microbatches 4 --zero 1" in text
    assert "plain data parallel would take 0.2000 s/step (2.00x)" in text
    assert "10 layouts of 4 ranks" in text and "(2 over --max-memory)" in text


def test_across_hosts_a_group_on_two_hosts_talks_over_the_remote_link() -> None:
    """2 stages x 2 bundles on 2 hosts of 2 ranks: --map-by slot keeps a bundle's stages on one host (the
    gradients' average crosses), --map-by node puts its stages on two (the hops cross)."""
    from hvdhybrid.layout.hostfile import Host, place_ranks
    from hvdhybrid.layout.topology import Layout

    g, pl = StageGraph.chain(2), Placement.identity(2)
    plan = schedules.build("1f1b", g, 2, pl)
    local, remote = Link(1e-6, 1e10), Link(1e-4, 1e8)
    layout = Layout.pipeline(4, 2)
    hosts = [Host("a", 2), Host("b", 2)]
    c = Choice(1, 2, 2, 1, "1f1b", 2, 0, "none")
    times = _times(1e-3, 2e-3, out=10**6)

    def at(map_by: str) -> Prediction:
        return step_time(c, g, pl, plan, times, local, [10**6, 10**6], 0.0, cores=2, remote=remote,
                         hosts=place_ranks(hosts, 4, map_by), layout=layout)
    slot, node = at("slot"), at("node")
    assert place_ranks(hosts, 4, "slot") == ["a", "a", "b", "b"]
    # both stage groups average at once, through the one link between the hosts
    assert slot.reduce == pytest.approx(2 * remote.allreduce(2 * 10**6, 2))
    assert node.reduce == pytest.approx(local.allreduce(2 * 10**6, 2))
    assert node.pipeline > slot.pipeline  # each microbatch's activation crosses at 100 MB/s
    one_host = step_time(c, g, pl, plan, times, local, [10**6, 10**6], 0.0, per_host=4, cores=2)
    assert one_host.reduce == pytest.approx(local.allreduce(2 * 10**6, 2))
    # the host's cores: 2 ranks per host of 2 cores, against 4 ranks on one host of 2
    assert slot.pipeline <= one_host.pipeline + 1e-12


def test_the_search_space_marks_map_by_in_the_description() -> None:
    c = Choice(1, 2, 2, 1, "1f1b", 2, 0, "none", map_by="node")
    assert c.describe().endswith(", --map-by node") and "--map-by" not in c.options()


def test_a_crowded_host_costs_its_measured_slowdown_beyond_sharing_its_cores() -> None:
    from hvdhybrid.planner.links import crowding

    assert crowding({"crowd_ratio": 2.4, "host_ranks": 4.0, "host_cores": 2.0}) == pytest.approx(1.2)
    assert crowding({"crowd_ratio": 0.9, "host_ranks": 2.0, "host_cores": 2.0}) == 1.0  # never below 1
    assert crowding({}) == 1.0
    dp = Choice(1, 1, 4, 1, "1f1b", 1, 0, "none")
    g1, p1 = StageGraph.chain(1), Placement.identity(1)
    flat = schedules.build("1f1b", g1, 1, p1)
    link = Link(0.0, 1e9)

    def at(per_host: int, crowd: float) -> float:
        return step_time(dp, g1, p1, flat, {0: StageTime(1.0, 2.0, 0)}, link, [0], 0.0, per_host=per_host,
                         cores=2, crowd=crowd).pipeline
    assert at(4, 1.2) == pytest.approx(6.0 * 1.2)
    assert at(2, 1.2) == pytest.approx(3.0)  # as many ranks as cores: nothing shared


def test_on_a_crowded_host_each_tensor_collective_waits_for_a_wake_up() -> None:
    g, pl = StageGraph.chain(2), Placement.identity(2)
    plan = schedules.build("1f1b", g, 2, pl)
    t2 = Choice(2, 2, 1, 1, "1f1b", 2, 0, "none")
    talky = {s: StageTime(1.0, 2.0, 0, tensor_calls=10, tensor_bytes=0) for s in (0, 1)}
    link = Link(0.0, 1e9, wake=0.01)
    roomy = step_time(t2, g, pl, plan, talky, link, [1, 1], 0.0, per_host=4, cores=4)
    # 2 stages x 2 microbatches x (F + B), each with 5 of its 10 calls, on the critical path of 1f1b
    unit = {"F": 1.0, "B": 2.0}
    assert roomy.pipeline == pytest.approx(simulate(g, pl, plan, 2, costs=lambda a: unit[a.kind],
                                                    comm=0.01).makespan)
    # crowded: each call waits at most a wake-up (the host's work: 2 groups x 2 microbatches x 10 calls,
    # over 2 cores)
    asleep = step_time(t2, g, pl, plan, talky, Link(0.0, 1e9), [1, 1], 0.0, per_host=4, cores=2)
    crowded = step_time(t2, g, pl, plan, talky, link, [1, 1], 0.0, per_host=4, cores=2)
    assert asleep.pipeline < crowded.pipeline <= asleep.pipeline + 2 * 2 * 10 * 0.01 * 2 / 2 + 1e-9
    chain1, one = StageGraph.chain(1), Placement.identity(1)
    whole_host = step_time(Choice(4, 1, 1, 1, "1f1b", 2, 0, "none"), chain1, one,
                           schedules.build("1f1b", chain1, 2, one), {0: talky[0]}, link, [1], 0.0,
                           per_host=4, cores=2)
    # a group of the whole host has no other rank to wait behind: compute over the cores only
    assert whole_host.pipeline == pytest.approx(2 * 3.0 * 4 / 2)  # 4 ranks x 2 x (F + B) over 2 cores


def test_stage_groups_of_several_ranks_are_weighed_too() -> None:
    from hvdhybrid.layout.topology import Layout
    from hvdhybrid.planner.space import shapes

    assert sorted(shapes(3)) == [(1, 2), (2, 1)] and not list(shapes(2)) and (2, 2) in shapes(4)
    got = [c for c in choices(4, 12, layers=8, tensor_ok=False, attention=False) if c.widths]
    assert got and all(sum(c.widths) * c.bundles * c.tensor == 4 for c in got)
    assert all((12 // (c.bundles * c.microbatches)) % w == 0 for c in got for w in c.widths)
    c = next(c for c in got if c.widths == (2, 2))
    assert c.options()[2:4] == ["--bundle-shape", "2,2"] and "of widths 2+2" in c.describe()
    # 2 front ranks split each microbatch's rows: the front's work counts twice on the host, and its
    # gradients are averaged over its 2 ranks
    g, pl = StageGraph.chain(2), Placement.identity(2)
    plan = schedules.build("1f1b", g, 2, pl)
    link = Link(1e-3, 1e9)
    shaped = step_time(Choice(1, 2, 1, 1, "1f1b", 2, 0, "none", widths=(2, 1)), g, pl, plan, _times(1.0, 2.0),
                       link, [1000, 10], 0.0, per_host=3, cores=1, layout=Layout(3, (2, 1)))
    assert shaped.reduce == pytest.approx(link.allreduce(4 * 1000, 2))  # row replicas average in fp32
    assert shaped.pipeline == pytest.approx(3 * 2 * 3.0)  # 3 ranks x 2 microbatches x (F + B), one core


def test_the_link_between_hosts_keeps_its_own_wake_up() -> None:
    from hvdhybrid.planner.links import links, network, remote_link

    got = {"latency": 1e-5, "bandwidth": 1e10, "busy_latency": 2e-3, "remote_latency": 2e-5,
           "remote_bandwidth": 1.2e8, "remote_busy_latency": 5e-3}
    far = remote_link(got)
    assert far is not None and far.wake == pytest.approx(5e-3 - 2e-5)
    assert links(got)[0].wake == pytest.approx(2e-3 - 1e-5)
    assert remote_link({"latency": 1e-5, "bandwidth": 1e10}) is None
    net = network(got, cores=1, ranks_per_host=2, hosts={"node": ["a", "b", "a", "b"]})
    assert net.remote == far and net.crowd == 1.0
