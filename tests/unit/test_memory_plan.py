"""The memory prediction's arithmetic: ZeRO's shares with padding, ties on one rank, in-flight
activations walked along a plan (a split weight pass releases them), optimizer facts from one step."""

from __future__ import annotations

import torch

from hvdhybrid.pipeline.actions import Action
from hvdhybrid.training.memory_plan import OptimizerFacts, StageFacts, activations_peak, predict_rank
from hvdhybrid.training.memory_probe import optimizer_facts

ADAMW = OptimizerFacts(per_element=8, per_tensor=4)


def test_1f1b_walk_holds_as_many_microbatches_as_it_runs_ahead() -> None:
    plan = [Action(0, "F", 0), Action(0, "F", 1), Action(0, "B", 0), Action(0, "F", 2), Action(0, "B", 1),
            Action(0, "B", 2)]
    assert activations_peak(plan, {0: 10}) == 20
    split = [Action(0, "F", 0), Action(0, "B", 0), Action(0, "F", 1), Action(0, "W", 0), Action(0, "B", 1),
             Action(0, "W", 1)]
    assert activations_peak(split, {0: 10}) == 20  # microbatch 0 held until its weight pass


def test_unsharded_counts_every_element_and_tensor() -> None:
    got = predict_rank([StageFacts(100, 3, 0), StageFacts(50, 2, 0)], 0, ADAMW, 0, 4, [], {})
    assert got == {"parameters": 600, "gradients": 600, "optimizer": 8 * 150 + 4 * 5, "activations_peak": 0}


def test_zero_shares_are_padded_to_the_data_group() -> None:
    z1 = predict_rank([StageFacts(101, 3, 0)], 0, ADAMW, 1, 4, [], {})
    assert z1 == {"parameters": 4 * 104, "gradients": 4 * 104, "optimizer": 8 * 26 + 4, "activations_peak": 0}
    z2 = predict_rank([StageFacts(101, 3, 0)], 0, ADAMW, 2, 4, [], {})
    assert z2["gradients"] == 4 * 26 and z2["parameters"] == 4 * 104
    assert predict_rank([StageFacts(101, 3, 0)], 0, ADAMW, 2, 1, [], {})["gradients"] == 4 * 101  # one bundle


def test_a_tie_held_on_one_rank_counts_once() -> None:
    got = predict_rank([StageFacts(100, 2, 0), StageFacts(60, 2, 0)], 40, ADAMW, 0, 1, [], {}, 1)
    assert got["parameters"] == 4 * 120 and got["optimizer"] == 8 * 120 + 4 * 3


def test_optimizer_facts_from_one_step() -> None:
    assert optimizer_facts(lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True)) == OptimizerFacts(8, 4)
    assert optimizer_facts(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)) == OptimizerFacts(4, 0)
    assert optimizer_facts(lambda ps: torch.optim.SGD(ps, lr=0.1)) == OptimizerFacts(0, 0)
