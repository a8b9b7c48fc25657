"""The core promise: any layout ends with the parameters of one process on the same global batch.

For every layout that fits the world (pipeline stages x stage widths x bundles,
chains and fork/join graphs), GPipe and 1F1B, with and without gradient
accumulation: 3 optimizer steps of SGD with momentum, then every rank compares
its stage's parameters with a single-process reference computed on the same
global batches. fp32 with compression off: max abs difference <= 1e-5. With
fp16 compression on: within FP16_BOUND (see docs/transparency.md).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from models import Encoder, Join, chain, chain_reference, data, fork_join, task_pair
from torch import nn

from hvdhybrid.comm.groups import ProcessGroups
from hvdhybrid.config import TrainConfig
from hvdhybrid.layout.topology import Layout
from hvdhybrid.parallel.staged import StagedModel
from hvdhybrid.training.data import Sampler
from hvdhybrid.training.trainer import Trainer

STEPS, BATCH, LR = 3, 96, 0.1
FP32_TOL = 1e-5
FP16_BOUND = 2e-3  # measured max 3e-4 on these models; see docs/transparency.md


def opt(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


CLIP = 0.05  # below every gradient norm of these runs: clipping acts at every step


def reference(forward_model: nn.Module, fwd: Callable[[torch.Tensor], torch.Tensor],
              names: Callable[[], dict[str, torch.Tensor]], clip: float = 0.0) -> dict[str, torch.Tensor]:
    """Plain single-process training on the full global batch (no hvdhybrid runtime)."""
    ds = data()
    sampler = Sampler(len(ds), BATCH, seed=0)
    o = opt(forward_model.parameters())
    for _ in range(STEPS):
        x, y = ds.batch(sampler.next())
        loss = nn.functional.cross_entropy(fwd(x), y)
        o.zero_grad()
        loss.backward()
        if clip:
            norm = nn.utils.clip_grad_norm_(forward_model.parameters(), clip)
            assert norm > clip, f"gradient norm {norm} does not reach the clip {clip}"
        o.step()
    return {n: p.detach().clone() for n, p in names().items()}


def chain_ref(clip: float = 0.0) -> dict[str, torch.Tensor]:
    m = chain_reference()
    return reference(m, m, lambda: dict(m.named_parameters()), clip)


def fork_join_ref(clip: float = 0.0) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    e0, e1, j = Encoder(True), Encoder(False), Join(2, False)
    all_ = nn.ModuleDict({"enc0": e0, "enc1": e1, "join": j})
    return reference(all_, lambda x: j(e0(x), e1(x)), lambda: dict(all_.named_parameters()), clip)


def task_pair_ref(clip: float = 0.0) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    e0, j = Encoder(True), Join(1, True)
    all_ = nn.ModuleDict({"enc0": e0, "join": j})
    return reference(all_, lambda x: j(x, e0(x)), lambda: dict(all_.named_parameters()), clip)


CASES: dict[str, tuple[Callable[[int], StagedModel], Callable[[float], dict[str, torch.Tensor]]]] = {
    "chain": (lambda k: chain(k), chain_ref),
    "forkjoin": (lambda k: fork_join(), fork_join_ref),
    "taskpair": (lambda k: task_pair(), task_pair_ref),
}
_REFS: dict[tuple[str, float], dict[str, torch.Tensor]] = {}

# (model, widths): layouts; each runs with every bundle count the world allows
LAYOUTS = [
    ("chain", (1,)), ("chain", (1, 1)), ("chain", (2,)), ("chain", (1, 1, 1, 1)),
    ("chain", (2, 2)), ("chain", (1, 3)), ("chain", (3, 1)), ("chain", (1, 1, 2)),
    ("forkjoin", (1, 1, 1)), ("forkjoin", (1, 1, 2)), ("taskpair", (1, 1)),
]


def run_layout(world: Any, case: str, widths: tuple[int, ...], schedule: str, microbatches: int,
               accumulate: int, fp16: bool, clip: float = 0.0) -> float:
    if world.Get_size() % sum(widths):
        pytest.skip(f"world {world.Get_size()} does not fit widths {widths}")
    build, ref_fn = CASES[case]
    if (case, clip) not in _REFS:
        _REFS[(case, clip)] = ref_fn(clip)
    layout = Layout(world.Get_size(), widths)
    model = build(layout.num_stages)
    groups = ProcessGroups.create(layout, world)
    try:
        cfg = TrainConfig(steps=STEPS, batch_size=BATCH, microbatches=microbatches,
                          accumulate=accumulate, schedule=schedule, fp16_compression=fp16, progress=False,
                          clip_grad=clip)
        trainer = Trainer(groups, model, opt, cfg)
        trainer.fit(data())
        mine = trainer.named_parameters()
        ref = _REFS[(case, clip)]
        assert mine, "every stage of these models has parameters"
        worst = max(float((mine[n] - ref[n]).abs().max()) for n in mine)
    finally:
        groups.close()
    from mpi4py import MPI

    return float(world.allreduce(worst, op=MPI.MAX))


@pytest.mark.parametrize("case,widths", LAYOUTS, ids=[f"{c}-{'x'.join(map(str, w))}" for c, w in LAYOUTS])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("microbatches,accumulate", [(1, 1), (4, 1), (2, 2)])
def test_fp32_matches_single_process(world: Any, case: str, widths: tuple[int, ...], schedule: str,
                                     microbatches: int, accumulate: int) -> None:
    worst = run_layout(world, case, widths, schedule, microbatches, accumulate, fp16=False)
    assert worst <= FP32_TOL, f"max |param - reference| = {worst:.3g}"


@pytest.mark.parametrize("case,widths", [("chain", (1,)), ("chain", (1, 1)), ("chain", (2,)),
                                         ("taskpair", (1, 1)), ("forkjoin", (1, 1, 2))])
def test_fp16_compression_within_bound(world: Any, case: str, widths: tuple[int, ...]) -> None:
    """Only where gradients really cross bundles in float16 (one bundle never compresses)."""
    if world.Get_size() // sum(widths) < 2:
        pytest.skip(f"world {world.Get_size()} holds one bundle of widths {widths}: nothing to compress")
    worst = run_layout(world, case, widths, "1f1b", 4, 1, fp16=True)
    assert worst <= FP16_BOUND, f"max |param - reference| = {worst:.3g} with fp16 compression"
    if world.Get_rank() == 0:
        print(f"fp16 {case} {widths}: max deviation {worst:.3g}")


@pytest.mark.parametrize("case,widths", [("chain", (1,)), ("chain", (1, 1)), ("chain", (2, 2)),
                                         ("chain", (1, 3)), ("forkjoin", (1, 1, 2))])
def test_clipping_by_global_norm_matches_single_process(world: Any, case: str,
                                                        widths: tuple[int, ...]) -> None:
    """The norm is the whole model's (all stages, replicas counted once), as clip_grad_norm_ sees it."""
    assert run_layout(world, case, widths, "1f1b", 2, 1, False, clip=CLIP) <= FP32_TOL
