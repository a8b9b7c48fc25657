"""Text out of the language-model commands: the ``sample`` subcommands and the sample after a run."""

from __future__ import annotations

from typing import Any, Callable

import click

from ..comm.agreement import agreed, world
from ..log import get_logger

__all__ = ["end_sample", "sample_options", "sample_text"]


def sample_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``SOURCE --prompt --tokens --top-k --seed``."""
    for o in reversed([
        click.argument("source", type=click.Path()),
        click.option("--prompt", required=True, help="Text to continue."),
        click.option("--tokens", type=int, default=100, show_default=True,
                     help="New tokens (bytes for a byte-level model) to generate."),
        click.option("--top-k", type=int, default=0, show_default=True,
                     help="0: greedy (the most likely token); K: draw from the K most likely."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the draws (with --top-k)."),
    ]):
        fn = o(fn)
    return fn


def sample_text(make: Callable[[Any], Any], prompt: str, tokens: int, top_k: int, seed: int) -> None:
    """Build the sampler on every rank (``make(world)``; one agreed error line), generate together
    (tensor-parallel over the world), print on rank 0."""
    from ..models.sampling import SampleError

    w = world()
    with agreed(w):
        sampler = make(w)
        if not sampler.codec.encode(prompt):
            raise SampleError("--prompt is empty; give some text to continue")
        if tokens < 1 or top_k < 0:
            raise SampleError(f"--tokens must be >= 1 and --top-k >= 0 (got {tokens}, {top_k})")
    text = sampler(prompt, tokens, top_k, seed)
    if w.Get_rank() == 0:
        click.echo(prompt + text)


def end_sample(make: Callable[[Any], Any], prompt_ids: list[int], tokens: int = 32) -> None:
    """On this one rank, after a run: continue ``prompt_ids`` greedily from the run's final checkpoint
    (``make(MPI.COMM_SELF)``) and log it."""
    from mpi4py import MPI

    sampler = make(MPI.COMM_SELF)
    prompt = sampler.codec.decode(prompt_ids)
    get_logger().info(f"sample (greedy): {prompt!r} -> {sampler(prompt, tokens)!r}")
