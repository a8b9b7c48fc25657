"""``hvdhybrid plan -np N MODEL [its options]``: each rank's memory, predicted before any rank runs.

The model command runs as far as :func:`session.run_model` in this one
process; there, instead of training, :func:`predict` builds each stage as its
rank would, measures its facts (:mod:`hvdhybrid.training.memory_probe`) and
predicts every rank's figures (:mod:`hvdhybrid.training.memory_plan`): the ones
a run logs and writes to ``memory.json``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Optional

from ..config import Config, ConfigError, check_batch
from ..layout.placement import Placement
from ..layout.rows import replica_rows

__all__ = ["MODELS", "predict", "predict_memory", "render_memory", "run_as_planner"]

#: the commands that train (``grover`` trains through its pretrain and finetune subcommands)
MODELS = ("mlp", "resnet", "gpt", "gpt2", "bert", "grover", "run")
_TOOLS = ("sample", "make-test-model", "plan-slices", "baseline", "configs")


def predict(name: str, cfg: Config, np_: int, default_widths: tuple[int, ...],
            widths: Optional[tuple[int, ...]], build: Callable[[int, Any], Any],
            tensor_parallel: bool) -> dict[str, Any]:
    """The prediction for ``np_`` ranks of model command ``name`` (what :func:`session.run_model` got)."""
    import torch

    from ..parallel.recompute import Recompute
    from ..parallel.staged import StagedModel
    from ..pipeline import schedules as sched
    from ..training.memory_probe import StandInComm, measure_stage, optimizer_facts
    from ..training.precision import Precision

    p = cfg.parallel
    if p.tensor > 1 and not tensor_parallel:
        raise ConfigError(f"hvdtrain {name} cannot split its tensors (--tensor {p.tensor})")
    layout = p.layout(np_, default_widths, widths)
    check_batch(cfg, layout)
    torch.manual_seed(cfg.run.seed)
    built = build(p.model_stages(layout), layout)
    if built.slices is not None:
        raise ConfigError("hvdtrain plan predicts memory for whole sequences; drop --slices to plan it")
    n = p.model_stages(layout)
    placement = p.placement_for(layout, cfg.pipeline.schedule) or Placement.identity(n)
    rc = Recompute.parse(cfg.pipeline.recompute)
    rc.check(n, built.attention, f"hvdtrain {name}", False)
    model = built.model if isinstance(built.model, StagedModel) else \
        built.model(SimpleNamespace(tensor=StandInComm(layout.tensor, 0)))
    mbs = cfg.pipeline.microbatches
    plans = sched.build(cfg.pipeline.schedule, model.graph, mbs, placement,
                        batch_w=cfg.pipeline.weights_per_w())
    per_pass = cfg.optim.batch_size // cfg.optim.accumulate
    modules: dict[int, Any] = {}
    facts = {}
    autocast = Precision(cfg.optim.precision).autocast(torch.device("cpu"))
    for s in range(n):
        pos = placement.position_of(s)
        lo, hi = replica_rows(per_pass, layout.num_bundles, 0, mbs, 0, layout.widths[pos], 0)
        with autocast():
            facts[s] = measure_stage(model, modules, s, built.train_set.batch(list(range(hi - lo))),
                                     rc.mode_of(s), cfg.run.seed, rows=hi - lo)
    from ..training.memory_plan import position_figures, tie_sizes

    ties = tie_sizes(model, modules)
    modules.clear()
    rows = position_figures(layout, placement, plans, facts, ties, optimizer_facts(built.optimizer_fn),
                            cfg.optim.zero)
    return {"model": name, "layout": layout.describe(), "zero": cfg.optim.zero,
            "recompute": cfg.pipeline.recompute, "schedule": cfg.pipeline.schedule, "microbatches": mbs,
            "positions": rows}


def predict_memory(command: list[str], np_: int, cli: Any) -> dict[str, Any]:
    """``hvdtrain plan -np N MODEL ...``: ``command`` is the model command and its options (as after
    ``hvdtrain``), ``cli`` the group that holds it; returns the prediction (see :func:`predict`). From
    Python: :func:`hvdhybrid.cli.main.plan_memory`."""
    got: dict[str, Any] = {}

    def planner(name: str, cfg: Config, default_widths: tuple[int, ...], widths: Any, build: Any,
                tensor_parallel: bool) -> None:
        got.update(predict(name, cfg, np_, default_widths, widths, build, tensor_parallel))

    run_as_planner(command, cli, planner)
    return got


def run_as_planner(command: list[str], cli: Any, planner: Callable[..., None]) -> None:
    """Run model command ``command`` (as after ``hvdtrain``) of group ``cli`` in this process as far
    as :func:`session.run_model`, which hands ``planner`` what it got instead of training:
    ``planner(name, cfg, default_widths, widths, build, tensor_parallel)``.

    Raises:
        ConfigError: not a training command, or its options are wrong (one line).
    """
    import click

    from . import session

    if not command or command[0] not in MODELS or (len(command) > 1 and command[1] in _TOOLS):
        what = " ".join(command[:2])
        raise ConfigError(f"hvdtrain plan: {what!r} is not a training command; give one of "
                          f"{', '.join(MODELS)} (grover pretrain or finetune) with its options")
    reached: list[bool] = []

    def hook(*args: Any) -> None:
        reached.append(True)
        planner(*args)

    session.PLANNER.append(hook)
    try:
        cli.main(args=list(command), prog_name="hvdtrain", standalone_mode=False)
    except click.ClickException as e:
        raise ConfigError(f"hvdtrain {' '.join(command[:1])}: {e.format_message()}") from None
    finally:
        session.PLANNER.pop()
    if not reached:
        raise ConfigError(f"hvdtrain {' '.join(command[:2])} did not reach training; give one of "
                          f"{', '.join(MODELS)} (grover pretrain or finetune) with its options")


def render_memory(pred: dict[str, Any]) -> str:
    """The prediction as a table, one row per stage group position (its ranks alike)."""
    mb = 2 ** 20  # as the run logs them
    lines = [f"memory per rank, predicted (MB): hvdtrain {pred['model']} at {pred['layout']}, "
             f"--zero {pred['zero']}, --recompute {pred['recompute']}, schedule {pred['schedule']}, "
             f"{pred['microbatches']} microbatches",
             f"{'ranks':<14} {'stages':<8} {'parameters':>11} {'gradients':>10} {'optimizer':>10} "
             f"{'activations':>12} {'total':>9}"]
    for r in pred["positions"]:
        total = r["parameters"] + r["gradients"] + r["optimizer"] + r["activations_peak"]
        ranks, stages = ",".join(map(str, r["ranks"])), ",".join(map(str, r["stages"]))
        figs = " ".join(f"{r[k] / mb:>{w}.1f}" for k, w in (("parameters", 11), ("gradients", 10),
                                                               ("optimizer", 10), ("activations_peak", 12)))
        lines.append(f"{ranks:<14} {stages:<8} {figs} {total / mb:>9.1f}")
    lines.append("(gradients at their largest after the synchronisation; activations: the peak kept for "
                 "the backward; the interpreter, libraries and transient buffers come on top)")
    return "\n".join(lines)
