"""Hugging Face GPT-2 in tensor x pipeline x data: the parameters after 3 steps equal one process
running the unmodified GPT2LMHeadModel on the same batch (dropout off there); with dropout on (keyed),
every layout equals the one-rank run of the same code."""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
from models import byte_windows, plain_loop
from torch import nn

from hvdhybrid.comm.groups import ProcessGroups
from hvdhybrid.config import TrainConfig
from hvdhybrid.layout.topology import Layout
from hvdhybrid.models.gpt2.model import gpt2_model, hf_config, hf_model, unit_names
from hvdhybrid.training.data import Sampler, TensorDataset
from hvdhybrid.training.trainer import Trainer

STEPS, BATCH, LR, SEQ = 3, 8, 0.05, 24


def data() -> TensorDataset:
    return byte_windows(SEQ)


def opt(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def reference() -> dict[str, torch.Tensor]:
    """One process, the stock model, a plain loop."""
    m = hf_model(hf_config("tiny", dropout=0.0), 0)
    m.train()
    ds, o = data(), opt(m.parameters())
    sampler = Sampler(len(ds), BATCH, seed=0)
    for _ in range(STEPS):
        x, y = ds.batch(sampler.next())
        o.zero_grad()
        logits = m(input_ids=x).logits
        nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        o.step()
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def run(world: Any, widths: tuple[int, ...], tensor: int,
        dropout: float) -> Optional[dict[str, torch.Tensor]]:
    layout = Layout(world.Get_size(), widths, tensor)
    groups = ProcessGroups.create(layout, world)
    n_units = len(unit_names(2))
    sizes = [n_units] if len(widths) == 1 else [2, n_units - 2]
    try:
        model = gpt2_model(hf_config("tiny", dropout=dropout), 0, sizes, groups.tensor)
        cfg = TrainConfig(steps=STEPS, batch_size=BATCH, microbatches=2, fp16_compression=False,
                          progress=False,
                          timeout=60)
        trainer = Trainer(groups, model, opt, cfg)
        stock = hf_model(hf_config("tiny", dropout=dropout), 0)
        assert model.parameter_count() == sum(p.numel() for p in stock.parameters())  # shards whole
        trainer.fit(data())
        return trainer.gather_parameters()
    finally:
        groups.close()


LAYOUTS = [((1,), 2), ((1, 1), 2), ((1,), 1), ((1, 1), 1)]


@pytest.mark.parametrize("widths,tensor", LAYOUTS, ids=["tensor2", "tensor2-pipeline2", "data", "pipeline2"])
def test_gpt2_matches_the_stock_model(world: Any, widths: tuple[int, ...], tensor: int) -> None:
    if world.Get_size() % (len(widths) * tensor):
        pytest.skip(f"world {world.Get_size()} does not fit")
    ref = reference()
    got = run(world, widths, tensor, 0.0)
    worst = None
    if got is not None:
        assert set(ref) <= set(got)
        worst = max(float((got[n] - ref[n]).abs().max()) for n in ref)
        moved = max(float((ref[n] - p).abs().max())
                    for n, p in hf_model(hf_config("tiny", dropout=0.0), 0).named_parameters())
        assert moved > 1e-2
    worst = world.bcast(worst, root=0)
    assert worst <= 1e-5, f"max |param - stock GPT2LMHeadModel| = {worst:.3g}"


def one_process_with_dropout(p: float) -> dict[str, torch.Tensor]:
    """The same staged code in one process (tensor 1, no runtime), a plain loop with keyed rows."""
    from mpi4py import MPI

    model = gpt2_model(hf_config("tiny", dropout=p), 0, [len(unit_names(2))], MPI.COMM_SELF)
    m = model.build(0)
    plain_loop(m, data(), opt(m.parameters()), model.loss_fn, STEPS, BATCH)
    return {n: p.detach().clone() for n, p in model.stage_parameters(0, m).items()}


def test_gpt2_dropout_on_matches_one_process(world: Any) -> None:
    """Keyed dropout (attention heads drawn whole, then split): tensor 2 (x data) equals one process."""
    if world.Get_size() % 2:
        pytest.skip("needs tensor 2")
    mine = run(world, (1,), 2, 0.1)
    worst = None
    if mine is not None:
        one, nodrop = one_process_with_dropout(0.1), one_process_with_dropout(0.0)
        worst = max(float((mine[n] - one[n]).abs().max()) for n in one)
        assert max(float((one[n] - nodrop[n]).abs().max()) for n in one) > 1e-3  # dropout acts
    worst = world.bcast(worst, root=0)
    assert worst <= 1e-5, f"max |param - one process| = {worst:.3g}"
