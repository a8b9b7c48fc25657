"""``hvdtrain run TARGET``: train the model of any build function (pkg.module:build or file.py:build)."""

from __future__ import annotations

from typing import Any

import click

from ..comm.agreement import agreed, world
from ..config import Config
from .options import config_options
from .sequential import accuracy_eval, classify, layer_sizes
from .session import Built, run_model

__all__ = ["run_job"]


@click.command(name="run")
@config_options(steps=100, batch_size=32, lr=1e-3, microbatches=4)
@click.argument("target")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE",
              help="Passed to the build function as a keyword (a string); repeat for more.")
def run_job(cfg: Config, target: str, args: tuple[str, ...]) -> None:
    """Train the model of any build function: TARGET is pkg.module:build or path/to/file.py:build.

    The function is called on every rank as build(stages=K, **args) and returns
    an hvdhybrid.Job (model: a StagedModel or a list of layer factories;
    train_set; optional loss_fn, optimizer, eval_set, metric). Every common
    option applies. Example: hvdtrain run docs/examples/build_fn.py:build --stages 2
    """
    import torch

    from ..parallel.staged import StagedModel, sequential_model
    from ..training.job import call_build, layers_or_model, load_target, parse_args

    with agreed(world()):
        fn, kwargs = load_target(target), parse_args(args)

    def build(num_stages: int, layout: Any) -> Built:
        job = call_build(fn, num_stages, kwargs)
        model = layers_or_model(job)
        if not isinstance(model, StagedModel):
            fns = list(model)
            sizes = layer_sizes(cfg, fns, num_stages, job.train_set)
            model = sequential_model(fns, sizes, job.loss_fn or torch.nn.functional.cross_entropy,
                                     cfg.run.seed)

        def opt(params: Any) -> torch.optim.Optimizer:
            if job.optimizer:
                return job.optimizer(params)
            return torch.optim.AdamW(params, lr=cfg.optim.lr, fused=True)
        sets = {"eval": job.eval_set} if job.eval_set is not None else {}
        return Built(model, job.train_set, sets, accuracy_eval(job.metric or classify), opt,
                     f"run {target}: {model.graph.num_stages} stage(s)")

    run_model(f"run:{target.rpartition(':')[2]}", cfg, (1,), build)
