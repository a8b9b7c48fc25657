"""The core types end to end: tied parameters, several stages per rank, tensor shards, resharding
checkpoints, and evaluation over every row. Each against one plain process (fp32, 1e-5)."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Optional

import pytest
import torch
from models import chain, chain_reference, data, keyed_chain, keyed_reference, tensor_chain, tied_chain
from mpi4py import MPI
from torch import nn

from hvdhybrid.comm.groups import ProcessGroups
from hvdhybrid.config import TrainConfig
from hvdhybrid.layout.placement import Placement
from hvdhybrid.layout.topology import Layout
from hvdhybrid.parallel.staged import StagedModel
from hvdhybrid.training.data import Sampler
from hvdhybrid.training.trainer import Trainer

STEPS, BATCH = 3, 96
TOL = 1e-5


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.01)


def reference(module: nn.Module, fwd: Callable[[torch.Tensor], torch.Tensor], steps: int,
              opt: Callable[[Any], torch.optim.Optimizer] = sgd,
              clip: float = 0.0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Plain single-process training on the full global batch."""
    ds = data()
    sampler = Sampler(len(ds), BATCH, seed=0)
    o = opt(list({id(p): p for p in module.parameters()}.values()))
    for _ in range(steps):
        x, y = ds.batch(sampler.next())
        o.zero_grad()
        nn.functional.cross_entropy(fwd(x), y).backward()
        if clip:
            nn.utils.clip_grad_norm_(module.parameters(), clip)
        o.step()
    return module, o


def tied_reference(k: int, clip: float = 0.0) -> dict[str, torch.Tensor]:
    model = tied_chain(k)
    mods = {s: model.build(s) for s in range(k)}
    fwd = model.full(mods)  # shares the tie: one parameter, as in one process
    reference(nn.ModuleList([mods[s] for s in range(k)]), fwd, STEPS, clip=clip)
    return {n: p.detach().clone() for s in range(k) for n, p in model.stage_parameters(s, mods[s]).items()}


def worst_diff(world: Any, mine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert mine, "every rank of these layouts holds parameters"
    worst = max(float((mine[n] - ref[n].detach()).abs().max()) for n in mine)
    return float(world.allreduce(worst, op=MPI.MAX))


def train(world: Any, layout: Layout, model: Any, placement: Optional[Placement] = None,
          schedule: str = "1f1b", microbatches: int = 2, clip: float = 0.0,
          opt: Callable[[Any], torch.optim.Optimizer] = sgd, steps: int = STEPS,
          out: Optional[str] = None, resume: bool = False,
          groups: Optional[ProcessGroups] = None) -> Trainer:
    own = groups is None
    groups = groups or ProcessGroups.create(layout, world)
    try:
        cfg = TrainConfig(steps=steps, batch_size=BATCH, microbatches=microbatches, schedule=schedule,
                          fp16_compression=False, progress=False, clip_grad=clip, timeout=60, out=out,
                          model_name="chain")
        trainer = Trainer(groups, model(groups) if callable(model) and not isinstance(model, StagedModel)
                          else model, opt, cfg, placement=placement)
        if resume:
            assert out is not None and trainer.resume(os.path.join(out, "checkpoints")) is not None
        trainer.fit(data())
    finally:
        if own:
            groups.close()
    return trainer


def fits(world: Any, widths: tuple[int, ...], tensor: int = 1) -> Layout:
    if world.Get_size() % (sum(widths) * tensor):
        pytest.skip(f"world {world.Get_size()} does not fit widths {widths} x tensor {tensor}")
    return Layout(world.Get_size(), widths, tensor)


# -- tied parameters ---------------------------------------------------------------------------
TIED = [(2, (1, 1), None), (2, (2, 2), None), (4, (1, 1, 1, 1), None),
        (4, (1, 1), "looped"), (4, (1,), "contiguous"),
        (2, (1, 1), "1,0"), (4, (1, 1), "1,0,1,0")]  # the tie's first stage on the higher position


@pytest.mark.parametrize("k,widths,placement", TIED,
                         ids=[f"{k}st-{'x'.join(map(str, w))}-{p}" for k, w, p in TIED])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_tied_first_and_last_stage_match_one_process(world: Any, k: int, widths: tuple[int, ...],
                                                     placement: Optional[str], schedule: str) -> None:
    """First and last stage share ``w``: its gradient is the sum of both stages' parts."""
    layout = fits(world, widths)
    pl = Placement.parse(placement, k, len(widths)) if placement else None
    trainer = train(world, layout, tied_chain(k), pl, schedule, microbatches=4)
    assert worst_diff(world, trainer.named_parameters(), tied_reference(k)) <= TOL


@pytest.mark.parametrize("k,widths", [(2, (1, 1)), (4, (1, 1))])
def test_tied_clipping_counts_the_tie_once(world: Any, k: int, widths: tuple[int, ...]) -> None:
    layout = fits(world, widths)
    pl = Placement.looped(k, len(widths)) if k != len(widths) else None
    trainer = train(world, layout, tied_chain(k), pl, clip=0.05)
    assert worst_diff(world, trainer.named_parameters(), tied_reference(k, clip=0.05)) <= TOL


# -- several stages on one rank ------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["looped", "contiguous"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("microbatches", [1, 4])
def test_four_stage_chain_on_two_ranks_matches_one_process(world: Any, placement: str, schedule: str,
                                                           microbatches: int) -> None:
    layout = fits(world, (1, 1))
    trainer = train(world, layout, chain(4), Placement.parse(placement, 4, 2), schedule, microbatches)
    m = chain_reference()
    reference(m, m, STEPS)
    assert worst_diff(world, trainer.named_parameters(), dict(m.named_parameters())) <= TOL


def test_split_backward_and_weight_actions_match_one_process(world: Any) -> None:
    """A zero-bubble plan (B then W as separate actions) computes the same gradients."""
    from hvdhybrid.pipeline import schedules as sched

    if "zb1" not in sched.SCHEDULES:
        pytest.skip("no split-W schedule registered")
    layout = fits(world, (1, 1))
    trainer = train(world, layout, chain(2), schedule="zb1", microbatches=4)
    m = chain_reference()
    reference(m, m, STEPS)
    assert worst_diff(world, trainer.named_parameters(), dict(m.named_parameters())) <= TOL


# -- each rank builds only its own stages ----------------------------------------------------------
@pytest.mark.parametrize("widths", [(1,), (1, 1), (1, 1, 1, 1)])
def test_keyed_build_starts_where_one_process_starts(world: Any, widths: tuple[int, ...]) -> None:
    layout = fits(world, widths)
    k = len(widths)
    trainer = train(world, layout, keyed_chain(k))
    m = keyed_reference()
    reference(m, m, STEPS)
    assert worst_diff(world, trainer.named_parameters(), dict(m.named_parameters())) <= TOL
    held = world.allgather(sorted(trainer.named_parameters()))
    c = trainer.groups.coord
    assert sorted(held[c.rank]) == sorted(n for s in trainer.modules
                                          for n in trainer.model.stage_parameters(s, trainer.modules[s])), \
        "a rank holds its own stages' parameters and nothing else"


# -- tensor shards -------------------------------------------------------------------------------
@pytest.mark.parametrize("widths", [(1,), (1, 1)])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_column_parallel_shards_match_one_process(world: Any, widths: tuple[int, ...], clip: float) -> None:
    """Sharded parameters: averaged over rows and bundles, never over the tensor group; norms add shards."""
    layout = fits(world, widths, tensor=2)
    k = len(widths)
    trainer = train(world, layout, lambda g: tensor_chain(k, g.tensor), clip=clip)
    m = keyed_reference()
    reference(m, m, STEPS, clip=clip)
    full = trainer.gather_parameters()
    worst = None
    if world.Get_rank() == 0:
        assert full is not None and sorted(full) == sorted(n for n, _ in m.named_parameters())
        worst = max(float((full[n] - p.detach()).abs().max()) for n, p in m.named_parameters())
    worst = world.bcast(worst, root=0)  # every rank fails alike: none is left waiting
    assert worst <= TOL, f"max |param - reference| = {worst:.3g}"


# -- checkpoints that reshard ----------------------------------------------------------------------
def shared_tmp(world: Any) -> str:
    path = tempfile.mkdtemp(prefix="hvd-reshard-") if world.Get_rank() == 0 else None
    out: str = world.bcast(path, root=0)
    return out


@pytest.mark.parametrize("to_widths,to_stages", [((1, 1, 1, 1), 4), ((1,), 1), ((1, 1), 4), ((1, 1), 2)],
                         ids=["1x4", "4x1", "4-stages-on-2", "2x2-again"])
def test_resume_at_another_layout_continues_exactly(world: Any, to_widths: tuple[int, ...],
                                                    to_stages: int) -> None:
    """Save at 2 bundles x 2 stages (Adam), resume elsewhere; 3 more steps equal a run that never stopped."""
    if world.Get_size() != 4:
        pytest.skip("the issue's layouts: 2x2 -> 1x4 and 4x1 need 4 ranks")
    out = shared_tmp(world)
    train(world, Layout(4, (1, 1)), keyed_chain(2), opt=adam, out=out)
    pl = Placement.looped(to_stages, len(to_widths)) if to_stages != len(to_widths) else None
    trainer = train(world, Layout(4, to_widths), keyed_chain(to_stages), pl, opt=adam,
                    steps=2 * STEPS, out=out, resume=True)
    assert trainer.step == 2 * STEPS
    m = keyed_reference()
    _, o = reference(m, m, 2 * STEPS, opt=adam)
    ref = dict(m.named_parameters())
    assert worst_diff(world, trainer.named_parameters(), ref) <= TOL
    worst = 0.0
    for names in trainer.state.named_params.values():
        for n, p in names.items():
            got, want = trainer.optimizer.state[p], o.state[ref[n]]
            assert float(got["step"]) == float(want["step"]) == 2 * STEPS
            for k in ("exp_avg", "exp_avg_sq"):
                worst = max(worst, float((got[k] - want[k]).abs().max()))
    assert float(world.allreduce(worst, op=MPI.MAX)) <= TOL, "Adam moments must survive the reshard"


def test_tied_checkpoint_writes_the_tie_once_and_reloads(world: Any) -> None:
    layout = fits(world, (1, 1))
    out = shared_tmp(world)
    train(world, layout, tied_chain(2), out=out)
    if world.Get_rank() == 0:
        from hvdhybrid.training.checkpoint import Manifest, find_complete

        path, _ = find_complete(os.path.join(out, "checkpoints"))
        assert path is not None
        m = Manifest.read(os.path.join(path, "manifest.json"))
        assert "s0.w" in m.names and "s1.w" not in m.names, "a tie is stored once, by its first stage"
        assert sorted(m.shards) == ["common.pt", "stage-000.pt", "stage-001.pt"], \
            "one file per stage, not per bundle"
    world.Barrier()
    trainer = train(world, Layout(world.Get_size(), (1,)), tied_chain(2), Placement((0, 0)),
                    steps=2 * STEPS, out=out, resume=True)
    m2 = tied_chain(2)
    mods = {s: m2.build(s) for s in range(2)}
    reference(nn.ModuleList([mods[0], mods[1]]), m2.full(mods), 2 * STEPS)
    ref = {n: p for s in range(2) for n, p in m2.stage_parameters(s, mods[s]).items()}
    assert worst_diff(world, trainer.named_parameters(), ref) <= TOL


# -- evaluation counts every row ------------------------------------------------------------------
def _accuracy(out: Any, y: Any) -> tuple[float, int]:
    return float((out.argmax(-1) == y).sum()), int(y.shape[0])


@pytest.mark.parametrize("widths,stages", [((1,), 1), ((1, 1), 2), ((2,), 1), ((1, 3), 2),
                                           ((1, 1), 4), ((2, 2), 2)])
@pytest.mark.parametrize("rows", [287, 288, 5])
def test_evaluation_counts_every_row_at_every_layout(world: Any, widths: tuple[int, ...], stages: int,
                                                     rows: int) -> None:
    layout = fits(world, widths)
    ds = data(rows)
    m = chain_reference()
    with torch.no_grad():
        expect = float((m(ds.x).argmax(-1) == ds.y).sum()) / rows
    groups = ProcessGroups.create(layout, world)
    try:
        cfg = TrainConfig(steps=0, batch_size=BATCH, microbatches=2, fp16_compression=False,
                          progress=False, timeout=60)
        pl = Placement.looped(stages, len(widths)) if stages != len(widths) else None
        trainer = Trainer(groups, chain(stages), sgd, cfg, placement=pl)
        acc, n = trainer.evaluate(ds, _accuracy, 64)
    finally:
        groups.close()
    assert n == rows and acc == pytest.approx(expect, abs=1e-12)


def test_sharded_checkpoint_resumes_without_tensor_ranks(world: Any) -> None:
    """Saved with column shards over 2 tensor ranks, resumed whole (tensor 1): slices joined by name."""
    layout = fits(world, (1,), tensor=2)
    out = shared_tmp(world)
    train(world, layout, lambda g: tensor_chain(1, g.tensor), opt=adam, out=out)
    if world.Get_rank() == 0:
        from hvdhybrid.training.checkpoint import Manifest, find_complete

        path, _ = find_complete(os.path.join(out, "checkpoints"))
        assert path is not None
        m = Manifest.read(os.path.join(path, "manifest.json"))
        pieces = m.names["0.0.weight"]
        assert [(p["file"], p["dim"], p["start"], p["stop"]) for p in pieces] == \
            [("stage-000-t00.pt", 0, 0, 16), ("stage-000-t01.pt", 0, 16, 32)]
        assert pieces[0]["shape"] == [32, 16]
    world.Barrier()
    trainer = train(world, Layout(world.Get_size(), (1,)), keyed_chain(1), opt=adam, steps=2 * STEPS,
                    out=out, resume=True)
    m = keyed_reference()
    reference(m, m, 2 * STEPS, opt=adam)
    assert worst_diff(world, trainer.named_parameters(), dict(m.named_parameters())) <= TOL


def test_lr_schedule_continues_after_a_resume_at_another_layout(world: Any) -> None:
    """Warmup 2 + cosine over 6 steps: 3 steps at one layout, a checkpoint, 3 at another."""
    from hvdhybrid.training.lr_schedule import factor

    out = shared_tmp(world)
    ds = data()
    groups = ProcessGroups.create(Layout(world.Get_size(), (1,)), world)
    try:
        cfg = TrainConfig(steps=6, batch_size=BATCH, microbatches=2, fp16_compression=False, progress=False,
                          timeout=60, out=out, model_name="chain", warmup=2, lr_schedule="cosine")
        first = Trainer(groups, keyed_chain(1), sgd, cfg)
        first.sampler = Sampler(len(ds), BATCH, seed=0)
        for _ in range(3):
            first.train_step(ds, first.sampler.next())
        first.save_checkpoint()
    finally:
        groups.close()
    widths = (1, 1) if world.Get_size() % 2 == 0 else (1,)
    groups = ProcessGroups.create(Layout(world.Get_size(), widths), world)
    try:
        trainer = Trainer(groups, keyed_chain(len(widths)), sgd, cfg)
        assert trainer.resume(os.path.join(out, "checkpoints")) is not None and trainer.step == 3
        trainer.fit(ds)
    finally:
        groups.close()
    m = keyed_reference()
    o = sgd(m.parameters())
    sampler = Sampler(len(ds), BATCH, seed=0)
    for t in range(1, 7):
        for g in o.param_groups:
            g["lr"] = 0.1 * factor(t, 6, 2, "cosine")
        x, y = ds.batch(sampler.next())
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    assert worst_diff(world, trainer.named_parameters(), dict(m.named_parameters())) <= TOL
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 0.1
