"""TeraPipe token slices: every sliced layout ends with the parameters of one process that runs the
whole model on whole sequences (no slices, no pipeline), after 3 steps, fp32 to 1e-5.

Layouts: 1, 2 and 4 stages (4 stages also looped on 2 stage groups), 1 and 2 bundles, tensor 2;
uniform slices and unequal (planned-style: shorter later) slices; 1 and 2 microbatches; GPipe,
1F1B and ZB-H1 (split B/W); dropout on (keyed by row, drawn for the whole sequence). With fp16
compression across 2 bundles: within FP16_BOUND.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

import pytest
import torch
from models import byte_windows, plain_loop

from hvdhybrid.comm.groups import ProcessGroups
from hvdhybrid.config import TrainConfig
from hvdhybrid.layout.placement import Placement
from hvdhybrid.layout.topology import Layout
from hvdhybrid.models.gpt.model import config, gpt_model, unit_names
from hvdhybrid.training.data import TensorDataset
from hvdhybrid.training.trainer import Trainer

STEPS, BATCH, LR, SEQ = 3, 8, 0.05, 24
FP16_BOUND = 2e-3  # as for the other models (docs/transparency.md)


def data() -> TensorDataset:
    return byte_windows(SEQ)


def opt(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


@lru_cache(maxsize=None)
def reference(dropout: float, tied: bool) -> dict[str, torch.Tensor]:
    """One process, the whole model, whole sequences, a plain loop."""
    from mpi4py import MPI

    cfg = config("tiny", dropout=dropout, tied=tied)
    model = gpt_model(cfg, 0, [len(unit_names(cfg.layers))], MPI.COMM_SELF)
    m = model.build(0)
    plain_loop(m, data(), opt(m.parameters()), model.loss_fn, STEPS, BATCH)
    return {n: p.detach().clone() for n, p in model.stage_parameters(0, m).items()}


def run(world: Any, positions: int, stages: int, tensor: int, slices: Optional[tuple[int, ...]],
        microbatches: int, schedule: str = "gpipe", dropout: float = 0.0, tied: bool = True,
        fp16: bool = False) -> Optional[dict[str, torch.Tensor]]:
    layout = Layout(world.Get_size(), (1,) * positions, tensor)
    groups = ProcessGroups.create(layout, world)
    units = len(unit_names(2))
    sizes = {1: [units], 2: [2, units - 2], 4: [1, 1, 1, 1]}[stages]
    try:
        cfg = config("tiny", dropout=dropout, tied=tied)
        model = gpt_model(cfg, 0, sizes, groups.tensor)
        tc = TrainConfig(steps=STEPS, batch_size=BATCH, microbatches=microbatches,
                         fp16_compression=fp16, progress=False,
                         timeout=60, schedule=schedule, slices=slices)
        pl = Placement.looped(stages, positions) if stages != positions else None
        trainer = Trainer(groups, model, opt, tc, placement=pl)
        trainer.fit(data())
        return trainer.gather_parameters()
    finally:
        groups.close()


CASES = [
    # (positions, stages, tensor, slices, microbatches, schedule)
    (1, 1, 1, (8, 8, 8), 1, "gpipe"),
    (1, 1, 1, (10, 8, 6), 2, "1f1b"),
    (2, 2, 1, (8, 8, 8), 1, "gpipe"),
    (2, 2, 1, (10, 8, 4, 2), 2, "gpipe"),
    (2, 2, 1, (12, 12), 2, "1f1b"),
    (2, 2, 1, (9, 8, 7), 2, "zb1"),
    (2, 2, 2, (10, 8, 6), 2, "gpipe"),
    (2, 4, 1, (8, 8, 8), 2, "1f1b"),
    (4, 4, 1, (8, 8, 8), 1, "gpipe"),
    (4, 4, 1, (9, 7, 5, 3), 2, "1f1b"),
]


def _ids(case: tuple[Any, ...]) -> str:
    pos, stages, tensor, sl, mb, sched = case
    return f"{stages}st-on{pos}-t{tensor}-sl{'_'.join(map(str, sl))}-mb{mb}-{sched}"


def _check(world: Any, got: Optional[dict[str, torch.Tensor]], ref: dict[str, torch.Tensor],
           bound: float) -> float:
    worst = None
    if got is not None:
        assert set(ref) == set(got), (sorted(ref), sorted(got))
        worst = max(float((got[n] - ref[n]).abs().max()) for n in ref)
    worst = world.bcast(worst, root=0)
    assert worst <= bound, f"max |param - one process, whole sequences| = {worst:.3g}"
    return float(worst)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_token_slices_match_one_process(world: Any, case: tuple[Any, ...]) -> None:
    positions, stages, tensor, slices, microbatches, schedule = case
    if world.Get_size() % (positions * tensor):
        pytest.skip(f"world {world.Get_size()} does not fit {positions} stage groups x tensor {tensor}")
    got = run(world, positions, stages, tensor, slices, microbatches, schedule)
    _check(world, got, reference(0.0, True), 1e-5)


def test_reference_moves(world: Any) -> None:
    """The comparison means something: 3 steps move the parameters well beyond the tolerance."""
    from mpi4py import MPI

    cfg = config("tiny")
    model = gpt_model(cfg, 0, [len(unit_names(cfg.layers))], MPI.COMM_SELF)
    init = {n: p.detach() for n, p in model.stage_parameters(0, model.build(0)).items()}
    ref = reference(0.0, True)
    assert max(float((ref[n] - init[n]).abs().max()) for n in ref) > 1e-2


def test_dropout_and_untied_with_slices(world: Any) -> None:
    """Keyed dropout drawn for the whole sequence and cut to each slice; an untied output layer."""
    if world.Get_size() % 2:
        pytest.skip("needs 2 stage groups")
    got = run(world, 2, 2, 1, (10, 8, 6), 2, "1f1b", dropout=0.1, tied=False)
    ref = reference(0.1, False)
    _check(world, got, ref, 1e-5)
    assert max(float((ref[n] - reference(0.0, False)[n]).abs().max()) for n in ref) > 1e-3  # dropout acts


def test_fp16_compression_with_slices_within_bound(world: Any) -> None:
    """2 stages x 2 bundles with Horovod fp16 compression across the bundles."""
    if world.Get_size() != 4:
        pytest.skip("needs 2 stages x 2 bundles")
    got = run(world, 2, 2, 1, (10, 8, 6), 2, "gpipe", fp16=True)
    worst = _check(world, got, reference(0.0, True), FP16_BOUND)
    if world.Get_rank() == 0:
        print(f"gpt slices + fp16 compression: max deviation {worst:.3g}")
