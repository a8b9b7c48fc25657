"""GROVER: task-parallel, pipeline and task+pipeline runs match one process (dyMPN hops, masks seeded).

The reference is plain PyTorch on the whole model (GroverNet) and the whole
global batch; the runs under test go through the runtime with each layout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import pytest
import torch
from rdkit import Chem

from hvdhybrid.comm.groups import ProcessGroups
from hvdhybrid.config import TrainConfig
from hvdhybrid.layout.topology import Layout
from hvdhybrid.models.grover.data import FinetuneSet, PretrainSet, build_vocabs, finetune_loss, pretrain_loss
from hvdhybrid.models.grover.features import DescriptorScaler, rdkit_2d
from hvdhybrid.models.grover.model import CONFIGS
from hvdhybrid.models.grover.staged import FinetuneHeads, GroverNet, PretrainHeads, stage_model
from hvdhybrid.parallel import randomness
from hvdhybrid.training.data import Sampler
from hvdhybrid.training.trainer import Trainer

SMILES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN(CC)CC", "c1ccncc1", "OC(=O)c1ccccc1", "CC(C)Cl", "C1CCCCC1",
          "CCOC(=O)C", "NCCO", "c1ccc2ccccc2c1", "CC#N", "O=C1CCCC1", "CS(=O)(=O)N", "FC(F)(F)c1ccccc1",
          "CCCCCCO"] * 2
STEPS, BATCH, LR = 3, 8, 0.005
CFG = CONFIGS["tiny"]


def mols() -> list[Any]:
    return [Chem.MolFromSmiles(s) for s in SMILES]


def finetune_parts(descriptors: bool = False) -> tuple[GroverNet, FinetuneSet]:
    """``descriptors``: RDKit 2D descriptors appended to both heads' input (--rdkit-2d)."""
    ms = mols()
    feats = None
    if descriptors:
        raw = rdkit_2d(ms)
        feats = DescriptorScaler(raw[: len(ms) // 2])(raw)
    torch.manual_seed(0)
    net = GroverNet(CFG, FinetuneHeads(CFG, 1, 0 if feats is None else feats.shape[1]))
    y = np.random.default_rng(0).normal(size=(len(SMILES), 1))
    return net, FinetuneSet(ms, y, features=feats)


def pretrain_parts(dropout: float = 0.0) -> tuple[GroverNet, PretrainSet]:
    """``dropout``: on every dropout of the model (GROVER base/large use 0.1), keyed by molecule."""
    av, bv = build_vocabs(mols())
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, dropout=dropout)
    net = GroverNet(cfg, PretrainHeads(cfg, len(av), len(bv), 85))
    return net, PretrainSet(mols(), av, bv)


def stream_parts(workers: int = 0) -> tuple[GroverNet, Any]:
    """The streamed corpus: SMILES (two that do not parse among them) read from an index, in shard order."""
    import hashlib
    import os
    import tempfile

    from hvdhybrid.models.grover.corpus import CorpusIndex, CorpusSource, index_corpus
    from hvdhybrid.models.grover.features import Vocab
    from hvdhybrid.models.grover.stream import StreamedPretrainSet
    from hvdhybrid.models.grover.workers import Workers

    rows = SMILES[:10] + ["C1CC(", "xyz"] + SMILES[10:]
    root = os.path.join(tempfile.gettempdir(), "hvdhybrid-stream-test")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, hashlib.md5("\n".join(rows).encode()).hexdigest() + ".smi")
    if not os.path.exists(path):
        with open(path + f".{os.getpid()}", "w") as f:
            f.write("\n".join(rows) + "\n")
        os.replace(path + f".{os.getpid()}", path)
    index = CorpusIndex(index_corpus(CorpusSource(path, (path,)), Workers(0), cache=root))
    av, bv = (Vocab.from_json(v) for v in index.vocabs)
    torch.manual_seed(0)
    net = GroverNet(CFG, PretrainHeads(CFG, len(av), len(bv), 85))
    return net, StreamedPretrainSet(index, index.n, 0.15, Workers(workers, index.vocabs))


PARTS = {"finetune": (finetune_parts, finetune_loss),
         "finetune-2d": (functools.partial(finetune_parts, descriptors=True), finetune_loss),
         "pretrain": (pretrain_parts, pretrain_loss),
         "pretrain-dropout": (functools.partial(pretrain_parts, dropout=0.2), pretrain_loss),
         "pretrain-stream": (stream_parts, pretrain_loss),
         "pretrain-stream-workers": (functools.partial(stream_parts, workers=1), pretrain_loss)}


def opt(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def reference(task: str) -> dict[str, torch.Tensor]:
    make, loss_fn = PARTS[task]
    net, ds = make()
    o = opt(net.parameters())
    sampler = ds.make_sampler(BATCH, 0) if hasattr(ds, "make_sampler") else Sampler(len(ds), BATCH, seed=0)
    for step in range(1, STEPS + 1):
        randomness.set_step(0, step)
        idx = sampler.next()
        randomness.set_rows(idx)
        g, t = ds.batch(idx)
        o.zero_grad()
        loss_fn(net(g), t).backward()
        o.step()
    return {n: p.detach().clone() for n, p in net.named_parameters()}


LAYOUTS = [(1, False), (1, True), (2, False), (2, True)]  # (stages per chain, task parallel)


@pytest.mark.parametrize("task", list(PARTS))
@pytest.mark.parametrize("stages,task_parallel", LAYOUTS, ids=["1", "tp", "pp2", "tp+pp2"])
@pytest.mark.parametrize("microbatches", [1, 2])
def test_grover_layouts_match_one_process(world: Any, task: str, stages: int, task_parallel: bool,
                                          microbatches: int) -> None:
    n_stages = stages * (2 if task_parallel else 1)
    if world.Get_size() % n_stages:
        pytest.skip(f"world {world.Get_size()} does not fit {n_stages} stages")
    layout = Layout(world.Get_size(), (1,) * n_stages)
    if BATCH % (layout.num_bundles * microbatches):
        pytest.skip("batch does not split")
    ref = reference(task)
    make, loss_fn = PARTS[task]
    net, ds = make()
    model = stage_model(net, stages, task_parallel, loss_fn)
    groups = ProcessGroups.create(layout, world)
    try:
        cfg = TrainConfig(steps=STEPS, batch_size=BATCH, microbatches=microbatches, fp16_compression=False,
                          progress=False, schedule="1f1b", timeout=30)
        trainer = Trainer(groups, model, opt, cfg)
        trainer.fit(ds)
        mine = trainer.named_parameters()
    finally:
        groups.close()
    assert mine
    worst = max(float((mine[k] - ref[k]).abs().max()) for k in mine)
    from mpi4py import MPI

    worst = world.allreduce(worst, op=MPI.MAX)
    assert worst <= 1e-5, f"max |param - reference| = {worst:.3g}"
    # every parameter of the model is owned by exactly one stage of bundle 0
    owned = world.allgather(sorted(mine) if groups.coord.bundle == 0 else [])
    names = [n for part in owned for n in part]
    assert sorted(names) == sorted(ref), "stages must partition the model's parameters"


def test_grover_dropout_matters(world: Any) -> None:
    """The dropout variant above is not a no-op: p 0.2 moves the reference's parameters."""
    with_drop, without = reference("pretrain-dropout"), reference("pretrain")
    assert max(float((with_drop[n] - without[n]).abs().max()) for n in without) > 1e-3


@pytest.mark.parametrize("stages,task_parallel", LAYOUTS, ids=["1", "tp", "pp2", "tp+pp2"])
def test_predict_returns_every_row_in_order(world: Any, stages: int, task_parallel: bool) -> None:
    """Trainer.predict: all 31 rows (not a multiple of bundles x microbatches), same as one process."""
    n_stages = stages * (2 if task_parallel else 1)
    if world.Get_size() % n_stages:
        pytest.skip(f"world {world.Get_size()} does not fit {n_stages} stages")
    layout = Layout(world.Get_size(), (1,) * n_stages)
    net, ds = finetune_parts()
    ds = FinetuneSet([Chem.MolFromSmiles(s) for s in SMILES[:31]], np.arange(31.0))
    net.eval()
    with torch.no_grad():
        pa, pb = net(ds.batch(range(31))[0])
    expect = (pa + pb) / 2
    model = stage_model(net, stages, task_parallel, finetune_loss)
    groups = ProcessGroups.create(layout, world)
    try:
        cfg = TrainConfig(steps=0, batch_size=BATCH, microbatches=2, fp16_compression=False,
                          progress=False, timeout=30)
        trainer = Trainer(groups, model, opt, cfg)
        got = trainer.predict(ds, 8, lambda out: (out[0] + out[1]) / 2)
    finally:
        groups.close()
    if world.Get_rank() == 0:
        assert got is not None and got.shape == expect.shape
        assert float((got - expect).abs().max()) <= 1e-5
    else:
        assert got is None
