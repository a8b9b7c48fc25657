"""Partitioning layers into stages, and split_sequential's parts and parameter names."""

from itertools import combinations, pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hvdhybrid.parallel.partition import PartitionError, balance, by_params, by_time, uniform
from hvdhybrid.parallel.staged import partition_sizes, split_sequential


def _best_max_sum(costs, parts):
    """Brute force: the smallest largest-stage cost over every contiguous split."""
    n = len(costs)
    best = None
    for cuts in combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        worst = max(sum(costs[a:b]) for a, b in pairwise(bounds))
        best = worst if best is None else min(best, worst)
    return best


def _stage_sums(costs, sizes):
    out, i = [], 0
    for n in sizes:
        out.append(sum(costs[i:i + n]))
        i += n
    return out


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_balance_matches_brute_force(data):
    costs = data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=9))
    parts = data.draw(st.integers(1, len(costs)))
    sizes = balance([float(c) for c in costs], parts)
    assert len(sizes) == parts and all(n >= 1 for n in sizes) and sum(sizes) == len(costs)
    assert max(_stage_sums(costs, sizes)) == _best_max_sum(costs, parts)


def test_balance_golden():
    assert balance([1, 1, 1, 1], 2) == [2, 2]
    assert balance([10, 1, 1, 1], 2) == [1, 3]
    assert balance([5], 1) == [1]


@pytest.mark.parametrize("n, parts, expected", [(4, 2, [2, 2]), (5, 2, [3, 2]), (7, 3, [3, 2, 2]),
                                                (3, 3, [1, 1, 1]), (6, 1, [6])])
def test_uniform(n, parts, expected):
    assert uniform([nn.ReLU() for _ in range(n)], parts) == expected


def test_by_params_linear_widths():
    # parameter counts 20, 320, 260, 20
    layers = [nn.Linear(4, 4), nn.Linear(4, 64), nn.Linear(64, 4), nn.Linear(4, 4)]
    assert by_params(layers, 2) == [2, 2]      # 340 | 280
    assert by_params(layers, 3) == [1, 1, 2]   # 20 | 320 | 280
    assert by_params(layers, 4) == [1, 1, 1, 1]


def test_by_params_counts_parameterless_layer_as_one():
    layers = [nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.Linear(1, 1)]  # costs 1, 1, 1, 2
    assert max(_stage_sums([1, 1, 1, 2], by_params(layers, 2))) == 3


@pytest.mark.parametrize("fn", [uniform, by_params])
def test_more_stages_than_layers(fn):
    with pytest.raises(PartitionError, match="cannot split 2 layers into 3 stages"):
        fn([nn.Linear(2, 2), nn.Linear(2, 2)], 3)
    with pytest.raises(PartitionError):
        fn([nn.Linear(2, 2)], 0)


def test_balance_too_many_parts():
    with pytest.raises(PartitionError):
        balance([1.0, 2.0], 3)


def test_by_time_needs_sample_and_returns_valid_sizes():
    layers = [nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2)]
    with pytest.raises(PartitionError, match="sample"):
        by_time(layers, 2)
    sizes = by_time(layers, 2, torch.randn(4, 8), repeats=1)
    assert len(sizes) == 2 and sum(sizes) == 4 and min(sizes) >= 1


def test_partition_sizes_unknown_strategy():
    with pytest.raises(PartitionError, match="unknown partition"):
        partition_sizes([nn.ReLU()], 1, "random")
    assert partition_sizes([nn.ReLU()] * 3, 2, "uniform") == [2, 1]


def _layers():
    torch.manual_seed(0)
    return [nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
            nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)]


@pytest.mark.parametrize("sizes", [[7], [3, 4], [1, 5, 1], [2, 2, 2, 1], [1] * 7])
def test_split_sequential_names_and_forward(sizes):
    layers = _layers()
    ref = nn.Sequential(*layers)
    model = split_sequential(layers, sizes, nn.functional.cross_entropy)
    assert model.graph.is_chain() and model.graph.num_stages == len(sizes)
    per_part = [[n for n, _ in part.named_parameters()] for part in model.stages]
    all_names = [n for names in per_part for n in names]
    assert len(all_names) == len(set(all_names))  # parts are disjoint
    ref_params = dict(ref.named_parameters())
    assert set(all_names) == set(ref_params)
    for part in model.stages:
        for n, p in part.named_parameters():
            assert p is ref_params[n]
    x = torch.randn(5, 6)
    y = x
    for part in model.stages:
        y = part(y)
    expected = ref(x)
    assert torch.equal(y, expected)
    assert torch.equal(model.full()(x), expected)


def test_split_sequential_reused_module_instance():
    """A module instance used at two positions runs at both, as in nn.Sequential."""
    torch.manual_seed(0)
    act = nn.ReLU()
    layers = [nn.Linear(3, 3), act, nn.Linear(3, 3), act]
    x = torch.randn(8, 3) - 3.0
    expected = nn.Sequential(*layers)(x)
    assert (expected >= 0).all()
    model = split_sequential(layers, [4], nn.functional.mse_loss)
    assert torch.equal(model.full()(x), expected)


@pytest.mark.parametrize("sizes", [[3, 3], [7, 0], [8], []])
def test_split_sequential_bad_sizes(sizes):
    with pytest.raises(PartitionError, match="do not cover 7 layers"):
        split_sequential(_layers(), sizes, nn.functional.cross_entropy)
