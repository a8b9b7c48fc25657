"""TeraPipe slice planning: the DP against exhaustive search, latency fits, uniform and --slices parsing."""

import json
import time

import numpy as np
import pytest

from hvdhybrid.errors import InputError
from hvdhybrid.pipeline.token_slices import (
    LatencyModel,
    PlanError,
    SlicePlan,
    best_uniform,
    brute_force,
    fit,
    parse_slices,
    plan_joint,
    plan_slices,
    residuals,
    step_time,
    uniform,
)

FIXED_MODELS = [
    LatencyModel(c0=1.0),                                   # overhead only
    LatencyModel(c0=5.0, c1=0.1, c2=0.01),                  # overhead dominates
    LatencyModel(c0=0.01, c1=0.1, c2=2.0),                  # context dominates
    LatencyModel(c1=1.0),                                   # linear: every slicing sums alike
    LatencyModel(c0=0.2, c1=0.3, c2=0.05, d0=0.1, d1=0.02, c3=0.04),  # everything
]


def _random_models(n: int, seed: int = 1234) -> list[LatencyModel]:
    rng = np.random.default_rng(seed)
    models = []
    for _ in range(n):
        on = rng.random(6) < 0.8  # switch some terms off
        scale = np.array([1.0, 0.1, rng.choice([0.001, 0.1, 3.0]), 0.5, 0.05, 0.02])  # c0 c1 c2 d0 d1 c3
        models.append(LatencyModel(*(float(v) for v in on * scale * rng.exponential(size=6))))
    return models


def _compositions(units: int):
    """Every way to write ``units`` as an ordered sum of positive integers (independent of the module)."""
    if units == 0:
        yield ()
        return
    for first in range(1, units + 1):
        for rest in _compositions(units - first):
            yield (first, *rest)


def _reference(model, seq_len, stages, rows, mbs, gran=1, max_slices=None):
    """Least step time over all slicings allowed, and the fewest slices that reach it."""
    times = []
    for comp in _compositions(seq_len // gran):
        if max_slices is None or len(comp) <= max_slices:
            lengths = [n * gran for n in comp]
            times.append((step_time(model, lengths, stages, mbs, rows), len(lengths)))
    best = min(t for t, _ in times)
    return best, min(n for t, n in times if t <= best * (1 + 1e-9))


def _check_plan(plan, model, seq_len, stages, rows, mbs, gran=1, max_slices=None):
    assert isinstance(plan, SlicePlan)
    assert sum(plan.lengths) == seq_len and all(n > 0 and n % gran == 0 for n in plan.lengths)
    assert (plan.rows, plan.microbatches) == (rows, mbs)
    assert plan.predicted == pytest.approx(step_time(model, plan.lengths, stages, mbs, rows), rel=1e-12)
    ctx = np.cumsum((0,) + plan.lengths[:-1])
    assert plan.t_max == pytest.approx(max(model.slice_time(rows, n, int(c))
                                           for n, c in zip(plan.lengths, ctx)), rel=1e-12)
    if max_slices is not None:
        assert len(plan.lengths) <= max_slices
    best, fewest = _reference(model, seq_len, stages, rows, mbs, gran, max_slices)
    assert plan.predicted == pytest.approx(best, rel=1e-9, abs=1e-300)
    assert len(plan.lengths) == fewest


CASES = [(m, L, K) for m in FIXED_MODELS + _random_models(6) for L in range(4, 13) for K in (1, 2, 3, 4)]


@pytest.mark.parametrize("model, seq_len, stages", CASES)
def test_dp_matches_exhaustive_search(model, seq_len, stages):
    _check_plan(plan_slices(model, seq_len, stages), model, seq_len, stages, 1, 1)
    _check_plan(brute_force(model, seq_len, stages), model, seq_len, stages, 1, 1)


@pytest.mark.parametrize("model", FIXED_MODELS + _random_models(8, seed=99))
@pytest.mark.parametrize("rows, mbs", [(2, 1), (1, 3), (3, 4), (1, 40)])
def test_dp_matches_exhaustive_search_with_batches(model, rows, mbs):
    for seq_len in (5, 9, 12):
        for stages in (2, 4):
            plan = plan_slices(model, seq_len, stages, rows=rows, microbatches=mbs)
            _check_plan(plan, model, seq_len, stages, rows, mbs)
            assert brute_force(model, seq_len, stages, rows, mbs).predicted == pytest.approx(plan.predicted)


@pytest.mark.parametrize("model", FIXED_MODELS + _random_models(8, seed=7))
def test_dp_with_granularity_and_max_slices(model):
    for seq_len in (4, 8, 12):
        for stages in (1, 3, 4):
            plan = plan_slices(model, seq_len, stages, rows=2, microbatches=2, granularity=2)
            _check_plan(plan, model, seq_len, stages, 2, 2, gran=2)
            bf = brute_force(model, seq_len, stages, 2, 2, granularity=2)
            assert bf.predicted == pytest.approx(plan.predicted, rel=1e-9)
            for cap in (1, 2, 3):
                plan = plan_slices(model, seq_len, stages, microbatches=2, max_slices=cap)
                _check_plan(plan, model, seq_len, stages, 1, 2, max_slices=cap)


def test_one_stage_with_overhead_is_one_slice():
    for model in (LatencyModel(c0=1e-3, c1=1e-6, d0=1e-4, d1=1e-8), LatencyModel(c0=1.0, c2=1e-6)):
        for mbs in (1, 4):
            assert plan_slices(model, 256, 1, rows=2, microbatches=mbs).lengths == (256,)


def test_ties_prefer_fewer_slices():
    # c1 only: every slicing sums to the same time, so one stage gains nothing from cutting
    assert plan_slices(LatencyModel(c1=1.0), 12, 1).lengths == (12,)
    assert brute_force(LatencyModel(c1=1.0), 12, 1).lengths == (12,)
    # with a pipeline the smallest slices shorten the fill and drain
    assert plan_slices(LatencyModel(c1=1.0), 12, 3).lengths == (1,) * 12


def test_context_heavy_plan_shrinks_slices_and_beats_uniform():
    model = LatencyModel(c0=1e-4, c1=1e-6, c2=2e-8, d0=1e-5, d1=1e-9)
    plan = plan_slices(model, 512, 4, granularity=16)
    n = plan.lengths
    assert len(n) > 1 and all(a >= b for a, b in zip(n, n[1:])) and n[0] > n[-1]
    uni = best_uniform(model, 512, 4)
    assert plan.predicted <= uni[0].predicted * (1 + 1e-12)
    assert plan.predicted < uni[0].predicted  # strictly better here: slices of equal length are not optimal


def test_step_time_formula():
    m = LatencyModel(c0=1.0, c1=2.0, c2=3.0, d0=0.5, d1=0.25)
    # slice (2 tokens, context 0) and (1 token, context 2), b = 2
    t1 = 1.0 + 2 * (2.0 * 2 + 3.0 * 2 * (0 + 2)) + 0.5 + 0.25 * 2 * 2
    t2 = 1.0 + 2 * (2.0 * 1 + 3.0 * 1 * (2 + 1)) + 0.5 + 0.25 * 2 * 1
    assert m.slice_time(2, 2, 0) == pytest.approx(t1) and m.slice_time(2, 1, 2) == pytest.approx(t2)
    assert m.stage_time(2, 1, 2) + m.transfer(2, 1) == pytest.approx(t2)
    assert step_time(m, [2, 1], 4, microbatches=3, rows=2) == pytest.approx(3 * (t1 + t2) + 3 * max(t1, t2))
    with pytest.raises(PlanError):
        step_time(m, [2, 0], 4)
    with pytest.raises(PlanError, match="stages"):
        step_time(m, [2, 1], 0)


def test_describe():
    plan = SlicePlan((96, 64, 48, 48), 2, 4, 1.234, 0.3)
    assert plan.describe() == "4 slices 96,64,48,48 x 2 microbatches of 4 sequences: 1.234 s"
    assert SlicePlan((256,), 1, 1, 0.5, 0.5).describe() == "1 slice 256 x 1 microbatch of 1 sequence: 0.5 s"


def _grid(model):
    stage = [(b, n, c, model.stage_time(b, n, c))
             for b in (1, 2, 4) for n in (32, 64, 128) for c in (0, 64, 384)]
    transfer = [(b, n, model.transfer(b, n)) for b in (1, 2, 4) for n in (32, 64, 128)]
    return stage, transfer


@pytest.mark.parametrize("true", [LatencyModel(2e-3, 3e-6, 4e-9, 1e-4, 5e-9, 7e-8),
                                  LatencyModel(1e-3, 0.0, 2e-9, 0.0, 1e-8)])
def test_fit_recovers_coefficients(true):
    stage, transfer = _grid(true)
    got = fit(stage, transfer)
    for name in ("c0", "c1", "c2", "c3", "d0", "d1"):
        want = getattr(true, name)
        assert getattr(got, name) == pytest.approx(want, rel=1e-6, abs=1e-6 * abs(want) + 1e-18), name
    assert max(abs(r) for r in residuals(got, stage)) < 1e-9
    assert fit(stage).d0 == 0.0 and fit(stage).d1 == 0.0  # no transfers measured


def test_fit_keeps_coefficients_non_negative():
    # times that fall with b*l (a negative c1) must not produce a negative coefficient
    stage = [(1, n, c, 1e-2 - 2e-6 * n + 1e-8 * n * (c + n))
             for n in (16, 32, 64, 128) for c in (0, 128, 512)]
    got = fit(stage)
    assert min(got.to_dict().values()) >= 0.0 and got.c1 == 0.0 and got.c2 > 0
    assert max(abs(r) for r in residuals(got, stage)) > 1e-3  # the clipped model cannot fit exactly
    # c0 and c2 are refitted without c1, not merely left where the unconstrained fit put them
    a = np.array([[1.0, n * (c + n), c] for _, n, c, _ in stage])
    y = np.array([s[3] for s in stage])
    c0, c2, c3 = np.linalg.lstsq(a / y[:, None], np.ones(len(y)), rcond=None)[0]  # relative least squares
    assert c3 >= 0 and (got.c0, got.c2, got.c3) == pytest.approx((c0, c2, c3), rel=1e-6)


def test_fit_errors():
    stage, transfer = _grid(LatencyModel(1e-3, 1e-6, 1e-9))
    with pytest.raises(PlanError, match="at least 3"):
        fit(stage[:2])
    with pytest.raises(PlanError, match="at least 2"):
        fit(stage, transfer[:1])
    with pytest.raises(PlanError, match="do not pin"):
        fit([stage[0]] * 5)
    with pytest.raises(PlanError, match="4 numbers"):
        fit([s[:3] for s in stage])
    with pytest.raises(PlanError, match="not positive"):
        residuals(LatencyModel(c0=1.0), [(1, 8, 0, 0.0)])


def test_model_round_trip_and_validation():
    m = LatencyModel(1e-3, 2e-6, 3e-9, 4e-5, 5e-10)
    assert LatencyModel.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    with pytest.raises(PlanError, match="expected exactly"):
        LatencyModel.from_dict({"c0": 1.0})
    with pytest.raises(PlanError, match="non-numeric"):
        LatencyModel.from_dict({**m.to_dict(), "c1": "fast"})
    with pytest.raises(PlanError, match="d0=-0.5"):
        LatencyModel.from_dict({**m.to_dict(), "d0": -0.5})
    with pytest.raises(PlanError, match="c2=-1.0"):
        LatencyModel(c2=-1.0)
    with pytest.raises(PlanError, match="finite"):
        LatencyModel(c0=float("nan"))


def test_uniform():
    assert uniform(10, 3) == (4, 3, 3)
    assert uniform(256, 4) == (64,) * 4
    assert uniform(7, 7) == (1,) * 7 and uniform(7, 1) == (7,)
    with pytest.raises(PlanError) as e:
        uniform(256, 300)
    assert str(e.value) == "--slices 300 is more than the sequence length 256; use at most 256"
    with pytest.raises(PlanError, match=r"--slices 0: .*N >= 1"):
        uniform(256, 0)


def test_best_uniform_sorted():
    model = LatencyModel(c0=1e-3, c1=1e-6, c2=1e-8)
    plans = best_uniform(model, 256, 4)
    assert sorted(len(p.lengths) for p in plans) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert [p.predicted for p in plans] == sorted(p.predicted for p in plans)
    for p in plans:
        assert p.predicted == pytest.approx(step_time(model, uniform(256, len(p.lengths)), 4))
    assert [len(p.lengths) for p in best_uniform(model, 100, 2, candidates=[3, 5])] in ([3, 5], [5, 3])


def test_parse_slices():
    assert parse_slices("auto", 256) is None and parse_slices(" AUTO ", 256) is None
    assert parse_slices("4", 10) == (3, 3, 2, 2)
    assert parse_slices("96, 64,48,48", 256) == (96, 64, 48, 48)


@pytest.mark.parametrize("text, fragment", [
    ("64,64,48", "--slices 64,64,48 sums to 176 but the sequence length is 256; give lengths that sum to 256 "
                 "(or --slices N for N equal slices)"),
    ("0", "--slices 0: need at least 1 slice"),
    ("-3", "--slices -3: need at least 1 slice"),
    ("300", "use at most 256"),
    ("abc", "--slices abc: expected 'auto', a number of slices N, or lengths like 64,64,48"),
    ("64,,192", "expected 'auto'"),
    ("64,0,192", "every slice length must be a positive integer"),
    ("1.5", "expected 'auto'"),
])
def test_parse_slices_errors(text, fragment):
    with pytest.raises(PlanError) as e:
        parse_slices(text, 256)
    assert isinstance(e.value, InputError) and fragment in str(e.value) and "\n" not in str(e.value)


def test_plan_errors():
    model = LatencyModel(c0=1.0)
    with pytest.raises(PlanError, match="granularity 32; use a granularity that divides it, e.g. 25$"):
        plan_slices(model, 100, 4, granularity=32)
    for kwargs in ({"stages": 0}, {"stages": 2, "rows": 0}, {"stages": 2, "max_slices": 0}):
        with pytest.raises(PlanError, match="must be a positive integer"):
            plan_slices(model, 16, **kwargs)
    with pytest.raises(PlanError, match="batch"):
        plan_joint(model, 16, 2, 0)
    with pytest.raises(PlanError, match="plan_slices"):
        brute_force(model, 64, 2)


def test_max_slices_one_is_one_slice():
    model = LatencyModel(c1=1.0, c2=1.0)
    assert plan_slices(model, 64, 4, granularity=4, max_slices=1).lengths == (64,)
    assert len(plan_slices(model, 64, 4, granularity=4, max_slices=3).lengths) == 3


@pytest.mark.parametrize("model", [LatencyModel(c0=1e-3, c1=1e-6, c2=2e-9, d0=1e-4, d1=1e-8),
                                   LatencyModel(c0=1e-1, c1=1e-6, c2=1e-9), LatencyModel(c1=1e-6, c2=1e-7)])
def test_plan_joint_is_best_over_divisors(model):
    batch, seq_len, stages = 12, 64, 4
    manual = [plan_slices(model, seq_len, stages, rows=b, microbatches=batch // b, granularity=8)
              for b in (1, 2, 3, 4, 6, 12)]
    joint = plan_joint(model, seq_len, stages, batch, granularity=8)
    assert joint.rows * joint.microbatches == batch
    assert joint.predicted == pytest.approx(min(p.predicted for p in manual), rel=1e-12)
    assert joint in manual


def test_overheads_favour_fewer_microbatches_in_plan_joint():
    # a big per-slice overhead and no pipeline fill to hide: the whole batch in one microbatch, one slice
    joint = plan_joint(LatencyModel(c0=1.0, c1=1e-6), 64, 1, 8)
    assert (joint.rows, joint.microbatches, joint.lengths) == (8, 1, (64,))


@pytest.mark.parametrize("granularity", [32, 64])
def test_planning_2048_tokens_is_fast(granularity):
    model = LatencyModel(c0=1e-3, c1=1e-6, c2=2e-9, d0=1e-4, d1=1e-8)
    start = time.perf_counter()
    plan = plan_slices(model, 2048, 4, rows=4, microbatches=2, granularity=granularity)
    assert time.perf_counter() - start < 5.0
    assert sum(plan.lengths) == 2048 and len(plan.lengths) > 1
    assert plan.predicted <= best_uniform(model, 2048, 4, rows=4, microbatches=2)[0].predicted
