"""GROVER's command-line pieces shared by its commands: model and data options, layout rule, helpers."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Callable, Optional

import click

from ..comm.agreement import world
from ..config import ParallelConfig
from ..layout.topology import LayoutError
from ..models.grover.config import CONFIGS, GroverConfig
from ..parallel.partition import PartitionError

__all__ = ["corpus_options", "corpus_source", "data_options", "describe",
           "grover_config", "grover_widths", "make_optimizer", "model_options",
           "say", "workers_for"]


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default=None,
                     help="Model size (default: small; finetune: the checkpoint's)."),
        click.option("--layers", type=int, default=None,
                     help="GTransformer layers per view (default: the config's); deeper for more stages."),
        click.option("--task-parallel", is_flag=True,
                     help="Node-view and edge-view encoders on two ranks of each bundle."),
        click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True,
                     help="sgd: with momentum 0.9. Adam turns float noise in near-zero gradients into "
                          "full steps, so only SGD runs match across layouts to float tolerance."),
        click.option("--smiles-col", default=None,
                     help="SMILES column: a name or a 0-based index (default: the first column "
                          "named *smiles*, else column 0)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def grover_widths(p: ParallelConfig, task_parallel: bool, cfg: GroverConfig) -> tuple[int, ...]:
    """One rank per stage: K stages per chain, two chains with task parallelism."""
    if p.bundle_shape is not None:
        raise LayoutError("GROVER stages have one rank each: use --stages K (and --task-parallel), "
                          "not --bundle-shape")
    k = 1 if p.stages is None else p.stages
    if k < 1:
        raise LayoutError(f"--stages must be >= 1, got {k}")
    if k > cfg.layers:
        raise PartitionError(f"cannot split {cfg.layers} GTransformer layers per view into {k} stages; "
                             f"use --layers {k} or more, or at most --stages {cfg.layers}")
    return (1,) * (k * (2 if task_parallel else 1))


def grover_config(name: Optional[str], layers: Optional[int], default: GroverConfig) -> GroverConfig:
    cfg = CONFIGS[name] if name else default
    if layers is not None:
        if layers < 1:
            raise PartitionError(f"--layers must be >= 1, got {layers}")
        cfg = replace(cfg, layers=layers)
    return cfg


def describe(name: str, cfg: GroverConfig, n_params: int) -> str:
    return (f"GROVER {name}: hidden {cfg.hidden}, {cfg.heads} heads, {cfg.layers} layers per view, "
            f"{cfg.hops} hops, ffn {cfg.ffn}, dropout {cfg.dropout}: {n_params:,} parameters")


def say(msg: str) -> None:
    """One line from world rank 0 (setup-phase progress, before the logger is tagged)."""
    if world().Get_rank() == 0:
        click.echo(f"[grover] {msg}", err=True)


def make_optimizer(lr: float, name: str) -> Callable[[Any], Any]:
    import torch

    def opt(params: Any) -> torch.optim.Optimizer:
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
        return torch.optim.Adam(params, lr=lr, fused=True)
    return opt



def data_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--data", type=click.Path(), default=None,
                     help="CSV of SMILES with label columns, or a built-in set: chembl2321810 (RDKit's "
                          "pIC50 set, the default) or b3db (blood-brain barrier, classification)."),
        click.option("--label-cols", default=None, metavar="COL[,COL..]",
                     help="Label columns: names or 0-based indices (needed with --data)."),
        click.option("--task", type=click.Choice(["regression", "classification"]), default="regression",
                     show_default=True, help="Metric: RMSE (in the labels' units) or mean ROC-AUC."),
        click.option("--split", type=click.Choice(["scaffold", "random"]), default="scaffold",
                     show_default=True),
        click.option("--split-sizes", default="0.8,0.1,0.1", show_default=True, metavar="TRAIN,VAL,TEST"),
        click.option("--split-seed", type=int, default=0, show_default=True),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _default_corpus() -> str:
    import importlib.util

    return "moses" if importlib.util.find_spec("moses") is not None else "rdkit"


def corpus_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--corpus", default=None, metavar="moses|rdkit|FILE",
                     help="Molecules to pretrain on: MOSES (1.58M, the default where molsets is installed), "
                          "the 15K that RDKit ships, or a CSV or .smi file (.gz too)."),
        click.option("--data", multiple=True, type=click.Path(),
                     help="Same as --corpus FILE; repeat for several files."),
        click.option("--max-molecules", type=int, default=0, show_default=True,
                     help="Use only the first N records of the corpus (0: all)."),
        click.option("--workers", "workers_spec", default="auto", show_default=True, metavar="N|auto",
                     help="Featurising processes per rank that reads data (0: the training process); "
                          "auto: one where the host has a core to spare beyond its ranks, else 0."),
        click.option("--corpus-cache", type=click.Path(), default=None,
                     help="Where the corpus index is kept (default: ~/.cache/hvdhybrid/corpus)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def workers_for(spec: str) -> int:
    """``--workers``: a count, or ``auto`` (one where the host's cores outnumber its ranks, else 0).

    Measured on 2 cores (docs/grover.md): one rank ran 1.4x faster with a worker on the
    spare core, two ranks 1.17x faster without one (nothing to spare: the worker only competes).
    """
    from ..training.data import DataError
    from ..training.device import local_size

    if spec.strip() == "auto":
        return 1 if (os.cpu_count() or 1) > local_size() else 0
    try:
        n = int(spec)
    except ValueError:
        raise DataError(f"--workers {spec!r}: give a number of processes or auto") from None
    if n < 0:
        raise DataError(f"--workers must be >= 0, got {n}")
    return n


def corpus_source(corpus: Optional[str], data: tuple[str, ...], column: str | int | None,
                  max_molecules: int) -> Any:
    """The pretraining corpus the options name, checked (``--corpus`` or ``--data``, not both)."""
    from ..models.grover.corpus import CorpusSource, resolve_corpus
    from ..training.data import DataError

    if max_molecules < 0:
        raise DataError(f"--max-molecules must be >= 0, got {max_molecules}")
    if corpus and data:
        raise DataError("--corpus and --data both name the corpus: give one")
    if data:
        for p in data:
            if not os.path.isfile(p):
                raise DataError(f"--data {p}: no such file; pass a CSV or .smi file of SMILES (.gz too), "
                                "or name a built-in corpus with --corpus moses|rdkit")
        return CorpusSource(data[0] if len(data) == 1 else ",".join(data), tuple(data), column)
    return resolve_corpus(corpus or _default_corpus(), column)
