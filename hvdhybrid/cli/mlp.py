"""``hvdtrain mlp``: a multilayer perceptron on scikit-learn's digits (fast; for trying layouts)."""

from __future__ import annotations

import click

from ..comm.agreement import agreed, world
from ..config import Config
from ..parallel.partition import PartitionError
from .options import config_options
from .sequential import sequential_build
from .session import run_model

__all__ = ["mlp"]


@click.command()
@config_options(steps=100, batch_size=64, lr=0.05, microbatches=4)
@click.option("--hidden", type=int, default=128, show_default=True)
@click.option("--depth", type=int, default=4, show_default=True)
def mlp(cfg: Config, hidden: int, depth: int) -> None:
    """A multilayer perceptron on scikit-learn's 8x8 digits (fast; for trying layouts)."""
    from ..models.mlp import mlp_layer_fns
    from ..training.data import digits

    with agreed(world()):
        if depth < 1:
            raise PartitionError(f"--depth must be >= 1, got {depth}")
        ds = digits(8)
    run_model("mlp", cfg, (1,), sequential_build(cfg, lambda: mlp_layer_fns(64, hidden, depth, 10), ds))
