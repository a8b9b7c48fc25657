"""One training run, from a checked config to results: agree across ranks, build, train, report.

Phases, and what a failure in each looks like to the user:

1. *setup* (no groups yet): every check of user input. Ranks agree with one
   ``allgather`` (:func:`~hvdhybrid.comm.agreement.agreed`); on any failure one line is
   printed by one rank and every rank exits with code 2. Nothing is written.
2. *run*: groups, (resume), training, evaluation. An exception prints the
   rank's tag and what happened, then ``MPI_Abort`` ends every rank.
   SIGTERM/SIGINT: the step finishes, a checkpoint is written, exit 128+signal.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .. import waits
from ..comm.agreement import agreed, world
from ..config import Config, ConfigError, check_batch
from ..errors import UserError
from ..layout.placement import Placement
from ..layout.topology import Layout
from ..parallel.recompute import Recompute
from ..training.data import DataError
from .launcher import LAYOUT_FILE_ENV

__all__ = ["Built", "ModelFn", "run_model", "steps_for_epochs"]

STOPPED_EXIT = 143  # 128 + SIGTERM: stopped on request, after a checkpoint

#: ``hvdtrain plan -np N MODEL ...`` puts its planner here: :func:`run_model` hands it what it got
#: (name, config, default widths, widths, build, tensor_parallel) instead of training
PLANNER: list[Callable[..., None]] = []


@dataclass
class Built:
    """What a model subcommand hands to :func:`run_model` (built alike on every rank)."""

    model: Any  # a StagedModel, or a ModelFn: groups -> StagedModel (a model that needs its communicators)
    train_set: Any
    eval_sets: dict[str, Any]  # name -> data set, evaluated after training ("eval", "val", "test")
    evaluate: Callable[[Any, Any], dict[str, float]]  # collective: (trainer, data set) -> metrics
    optimizer_fn: Callable[..., Any]
    describe: str = ""  # logged once by rank 0, e.g. the named config and its parameter count
    finish: Optional[Callable[[Any, str], None]] = None  # collective, after evaluation: (trainer, out)
    slices: Optional[tuple[int, ...]] = None  # token slices of every sequence (TeraPipe); None: whole
    attention: bool = False  # the model runs attention through recompute.attention (--recompute selective)
    helpers: int = 0  # processes a rank runs beside itself (GROVER's featurising workers): fewer threads


ModelFn = Callable[[Any], Any]
"""``groups -> StagedModel``: a model built once this rank's groups exist (they are handed in)."""


def steps_for_epochs(epochs: int, rows: int, batch_size: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``rows`` (the sampler drops a partial last batch)."""
    if epochs < 1:
        raise DataError(f"--epochs must be >= 1, got {epochs}")
    if batch_size > rows:
        raise DataError(f"--batch-size {batch_size} is larger than the {rows} training rows; "
                        f"use --batch-size {rows} or less")
    return epochs * (rows // batch_size)


def _check_out(out: str, resume: bool) -> None:
    """Never write into another run's directory; on resume, insist there is a run to resume."""
    holds_run = any(os.path.exists(os.path.join(out, f)) for f in ("metrics.jsonl", "checkpoints"))
    if resume and not holds_run:
        raise DataError(f"--resume: {out} holds no run to resume (no checkpoints/); "
                        "pass the --out of the run to continue")
    if not resume and holds_run:
        raise DataError(f"output directory {out} already holds a run; pass another --out, "
                        "or --resume to continue it")


def run_model(name: str, cfg: Config, default_widths: tuple[int, ...],
              build: Callable[[int, Layout], Built], tensor_parallel: bool = False,
              widths: Optional[tuple[int, ...]] = None) -> None:
    """Check everything against the world, agree across ranks, train, evaluate, write results.

    ``build(num_stages, layout)`` returns a :class:`Built`; it runs on every rank with the same
    seed. ``tensor_parallel``: the model can split its tensors (else ``--tensor`` > 1 is refused).
    ``widths``: the model's own rule gave the stage widths (GROVER: two chains with task parallelism).
    """
    if PLANNER:
        PLANNER[-1](name, cfg, default_widths, widths, build, tensor_parallel)
        return
    import torch

    from ..training.device import pick_device, rank_threads

    w = world()
    rank = w.Get_rank()
    p, r = cfg.parallel, cfg.run
    # ---- setup phase: everything that can fail on user input, before any group is made
    out = r.out
    auto_plan: Optional[dict[str, Any]] = None
    if p.layout_choice == "auto":  # rank 0 weighs every layout; all take its choice
        from ..planner.auto import choose_layout

        with agreed(w):
            cfg, auto_plan = choose_layout(name, cfg, w, default_widths, widths, build, tensor_parallel)
        p = cfg.parallel
    with agreed(w):
        if p.tensor > 1 and not tensor_parallel:
            raise ConfigError(f"hvdtrain {name} cannot split its tensors (--tensor {p.tensor}); use "
                              "--tensor 1 with --stages/--bundle-shape or more bundles (gpt and gpt2 "
                              "split tensors)")
        layout = p.layout(w.Get_size(), default_widths, widths)
        check_batch(cfg, layout)
        if r.trace and not os.path.isdir(os.path.dirname(os.path.abspath(r.trace))):
            raise DataError(f"--trace {r.trace}: its directory does not exist; create it or pass "
                            "another path")
        device = pick_device(r.device)
        threads = r.threads or rank_threads()
        torch.set_num_threads(threads)
        torch.manual_seed(r.seed)
        if out is None:
            if r.resume:
                raise DataError("--resume needs --out: the directory of the run to continue")
            out = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        _check_out(out, r.resume)
        placement = p.placement_for(layout, cfg.pipeline.schedule)
    with agreed(w):  # every rank describes the same model; failures here happen on all ranks alike
        built: Built = build(p.model_stages(layout), layout)
        if built.helpers and not r.threads:  # the rank's helper processes take a core each
            threads = rank_threads(built.helpers)
            torch.set_num_threads(threads)
        resolved: dict[str, Any] = {"model_name": name, "slices": built.slices}
        if cfg.optim.epochs is not None:
            resolved["steps"] = steps_for_epochs(cfg.optim.epochs, len(built.train_set), cfg.optim.batch_size)
        cfg = cfg.resolved(**resolved)
        check_batch(cfg, layout)
        Recompute.parse(cfg.pipeline.recompute).check(p.model_stages(layout), built.attention,
                                                      f"hvdtrain {name}", built.slices is not None)
        graph = getattr(built.model, "graph", None)
        if graph is not None:  # the schedule fits the layout: refused here in one line, not in the build
            from ..pipeline import schedules

            if built.slices and len(built.slices) > 1 and cfg.pipeline.batch_w > 1:
                raise ConfigError(f"--batch-w {cfg.pipeline.batch_w}: with token slices each W runs a whole "
                                  "backward and cannot be batched; drop --batch-w or --slices")
            schedules.build(cfg.pipeline.schedule, graph, cfg.pipeline.microbatches, placement,
                            len(built.slices) if built.slices else 1, cfg.pipeline.weights_per_w())
    out = w.bcast(out, root=0)
    assert out is not None
    cfg = cfg.resolved(out=out)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        if auto_plan is not None:  # what the planner predicted, to compare against the run (plan --check)
            with open(os.path.join(out, "plan.json"), "w") as f:
                json.dump(auto_plan, f, indent=1)
        if os.environ.get(LAYOUT_FILE_ENV):
            _write_layout(os.environ[LAYOUT_FILE_ENV], layout)
    w.Barrier()
    _train(w, name, cfg, layout, placement, built, device, threads)


def _write_layout(path: str, layout: Layout) -> None:
    coords = [layout.coord(r) for r in range(layout.world_size)]
    with open(path, "w") as f:
        json.dump({str(x.rank): x.tag() for x in coords}, f)


def _train(w: Any, name: str, cfg: Config, layout: Layout, placement: Optional[Placement],
           built: Built, device: Any, threads: int) -> None:
    import torch

    from ..comm import horovod_ops
    from ..comm.groups import ProcessGroups
    from ..comm.p2p import P2PTimeout
    from ..log import tag_logger
    from ..training.checkpoint import CheckpointError
    from ..training.memory import return_freed_memory
    from ..training.stopping import Stopped
    from ..training.trainer import Diverged, Trainer

    rank, size = w.Get_rank(), w.Get_size()
    tag = layout.coord(rank).tag()  # from the layout: the groups may be what fails
    log = tag_logger(tag)
    out, o = cfg.run.out, cfg.optim
    assert out is not None
    hang_dir = os.environ.get(waits.HANG_DIR_ENV) or os.path.join(out, "hang")
    reporter = waits.Reporter(tag, rank, hang_dir).start()  # a line on SIGUSR2 or a timeout
    try:
        # collective, and it starts Horovod: a rank failing here must not leave its peers waiting
        groups = ProcessGroups.create(layout, w)
        model = built.model if not callable(built.model) else built.model(groups)
        train_set = built.train_set
        trainer = Trainer(groups, model, built.optimizer_fn, cfg, device, placement)
        return_freed_memory()  # the build's temporaries (whole initial weights, copies into --zero's buffer)
        if cfg.run.resume:
            t_load = time.perf_counter()
            with agreed(w):
                path = trainer.resume(os.path.join(out, "checkpoints"))
                if path is None:
                    raise CheckpointError(f"--resume: no complete checkpoint in {out}/checkpoints")
            if rank == 0:
                load_s = time.perf_counter() - t_load
                log.info(f"resumed from {path} at step {trainer.step} (loaded in {load_s:.1f} s)")
                with open(os.path.join(out, "metrics.jsonl"), "a") as f:  # an event among the steps
                    f.write(json.dumps({"event": "resumed", "from": path, "resume_step": trainer.step,
                                        "world_size": size, "layout": layout.describe(),
                                        "load_s": load_s, "time": time.time()}) + "\n")
        if rank == 0:
            log.info(f"{name}: {layout.describe()}, schedule {cfg.pipeline.schedule}, "
                     f"{cfg.pipeline.microbatches} microbatches, batch {o.batch_size}, "
                     f"accumulate {o.accumulate}, precision {o.precision}, fp16 compression "
                     f"{'on' if cfg.comm.fp16_compression else 'off'}, device {device}, "
                     f"{threads} thread(s)/rank")
            if o.zero and layout.num_bundles == 1:
                log.info(f"--zero {o.zero} with one bundle: nothing to shard across bundles; the optimizer "
                         "state and gradients stay whole")
            elif o.zero:
                also = " and averaged gradients" if o.zero == 2 else ""
                log.info(f"--zero {o.zero}: optimizer state{also} sharded over each data group of "
                         f"{layout.num_bundles} ranks")
            if cfg.comm.reduce != "after":
                why = trainer.engine.reduce_fallback
                micro = cfg.comm.reduce == "microbatch"
                log.info(f"--reduce {cfg.comm.reduce}: " + (
                    (f"{why}; gradients go to their owners once per step" if micro else
                     f"{why}; the reduce runs after the schedule") if why else
                    "each microbatch's gradients go to their owners as its backward ends" if micro else
                    "gradients averaged across bundles during the last backward, bucket by bucket"))
            per_w = cfg.pipeline.weights_per_w()
            if per_w > 1 and not (cfg.pipeline.slices and len(cfg.pipeline.slices) > 1):
                log.info(f"batched W: the weight gradients of up to {per_w} microbatches of a stage as one "
                         "product per layer (--batch-w 1: one at a time)")
            if placement is not None:
                how = cfg.parallel.placement_name(cfg.pipeline.schedule)
                log.info(f"{model.graph.num_stages} model stages placed {how}: {placement.describe()}")
            if built.describe:
                log.info(built.describe)
            n_params = model.parameter_count()
            sets = ", ".join(f"{len(d)} {k}" for k, d in built.eval_sets.items())
            log.info(f"{n_params:,} parameters; {len(train_set)} training rows"
                     f"{', ' + sets if sets else ''} rows; output in {out}")
        trainer.write_json("config.json", trainer.config_dict())  # the config tree, and the layout
        if cfg.run.trace:
            from ..pipeline import trace

            trace.enable(w)
        t0 = time.perf_counter()
        first = trainer.step
        try:
            losses = trainer.fit(train_set)
        except Diverged as e:
            if rank == 0:
                log.error(f"hvdtrain: error: {e}")
            groups.close()
            horovod_ops.shutdown(w)
            sys.exit(1)
        except Stopped as e:
            if rank == 0:
                log.info(f"{e}; continue with --resume --out {out}")
            groups.close()
            horovod_ops.shutdown(w)
            sys.exit(STOPPED_EXIT)
        elapsed = time.perf_counter() - t0
        if cfg.run.trace:
            n_events = trace.write(w, cfg.run.trace, tag)
            if rank == 0:
                log.info(f"trace of {n_events} events written to {cfg.run.trace} (open it in https://ui.perfetto.dev)")
        results = {f"{k}_{m}": v for k, d in built.eval_sets.items()
                   for m, v in built.evaluate(trainer, d).items()}
        done = o.steps - first
        summary = {"model": name, "steps": o.steps, "final_loss": losses[-1] if losses else None,
                   **results, "skipped_steps": trainer.skipped_steps, "train_seconds": elapsed,
                   "samples_per_s": done * o.batch_size / max(elapsed, 1e-9)}
        trainer.write_json("summary.json", summary)
        _log_memory(w, trainer, layout, log)
        trainer.release_optimizer_state()  # the end-of-run work (gather, sample) fits in what it held
        params = trainer.gather_parameters() if cfg.run.save_params else None
        if built.finish is not None:
            built.finish(trainer, out)
        if rank == 0:
            if params is not None:
                torch.save(params, os.path.join(out, "params.pt"))
            shown = ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in results.items())
            log.info(f"done: {done} steps in {elapsed:.1f}s "
                     f"({summary['samples_per_s']:.0f} samples/s), final loss {_rounded(losses)}; "
                     f"{shown}; results in {out}")
        groups.close()
        reporter.close()
    except (SystemExit, UserError):
        raise
    except P2PTimeout as e:  # the message already names who waited for whom
        sys.stderr.write(f"[{tag}] {e}\n")
        sys.stderr.flush()
        if size > 1:  # every rank says what it waits for before the job ends
            waits.trigger(hang_dir)
            waits.collect(hang_dir, size)
        w.Abort(1)
        raise
    except BaseException:
        if size > 1:
            sys.stderr.write(f"[{tag}] failed:\n{traceback.format_exc()}")
            sys.stderr.flush()
            w.Abort(1)  # end every rank now instead of leaving peers waiting
        raise
    horovod_ops.shutdown(w)


def _log_memory(w: Any, trainer: Any, layout: Layout, log: Any) -> None:
    """Collective: every rank's bytes (parameters, gradients, optimizer state, saved activations, RSS),
    logged by rank 0 a line per rank and written to memory.json."""
    from ..allocator import running

    mine = {"rank": w.Get_rank(), "coord": layout.coord(w.Get_rank()).tag(), **trainer.memory(),
            "allocator": running()}
    every = w.gather(mine, root=0)
    if every is None:
        return
    trainer.write_json("memory.json", every)

    def mb(n: int) -> str:
        return f"{n / 2**20:.1f}"
    for m in every:
        log.info(f"memory of rank {m['rank']} (MB): parameters {mb(m['parameters'])}, gradients "
                 f"{mb(m['gradients'])}, optimizer state {mb(m['optimizer'])}, saved activations peak "
                 f"{mb(m['activations_peak'])}, peak RSS {mb(m['rss_peak'])} ({m['allocator']} allocator)")


def _rounded(losses: list[float]) -> str:
    """The last loss for the summary line, to 4 significant digits (summary.json keeps every digit)."""
    return f"{losses[-1]:.4g}" if losses else "none (no steps run)"
