"""``hvdtrain plan --auto``: every layout of :mod:`.space` for a model command, its memory per rank
(:mod:`hvdhybrid.training.memory_plan`) and its step time (:mod:`.predict`) from costs measured here,
the ones over the memory limit left out, fastest first.

The model is built once per (model stages, tensor size) and each stage is
measured once per (rows per microbatch, recomputation mode): a few dozen
forward-backward passes of one stage each for a small model, whatever the
number of layouts weighed.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, Callable, Optional

from ..config import Config, ConfigError, check_batch
from ..errors import USER_ERRORS
from ..layout.placement import Placement
from ..layout.traffic import ModelSizes, link_bytes
from .links import Link
from .probe import CountingComm, StageTime, optimizer_time, time_stage
from .space import choices

__all__ = ["PlanError", "search"]


class PlanError(ConfigError):
    """Nothing fits (with what would), or the model's costs cannot be measured here."""


@dataclasses.dataclass
class _Model:
    built: Any
    model: Any
    comm: CountingComm
    modules: dict[int, Any]


def search(name: str, cfg: Config, np_: int, default_widths: tuple[int, ...],
           widths: Optional[tuple[int, ...]], build: Callable[[int, Any], Any], tensor_parallel: bool,
           link: Link, cores: int, ranks_per_host: int, max_memory: Optional[int] = None, rest: int = 0,
           say: Callable[[str], None] = lambda s: None, allreduce: Optional[Link] = None,
           remote: Optional[Link] = None, hosts: Optional[dict[str, list[str]]] = None,
           crowd: float = 1.0) -> dict[str, Any]:
    """The ranked layouts for ``np_`` ranks of model command ``name`` (what :func:`session.run_model`
    handed the planner). ``rest``: bytes a rank holds beyond what the accounting counts (the
    interpreter and libraries), added to each prediction; ``max_memory``: the per-rank limit.
    ``hosts``: ``--map-by`` value -> the host of each rank (``{"": [...]}``: as launched; None: one
    host); ``remote``: the link between hosts; ``crowd``: a busy host's slowdown beyond sharing its
    cores (:func:`.links.crowding`).

    Raises:
        PlanError: a model with its own stage widths (GROVER's task branches), nothing fits the limit,
            or a stage cannot be measured.
    """
    import torch

    from ..parallel.recompute import Recompute
    from ..pipeline import schedules as sched
    from ..training.memory_plan import position_figures, tie_sizes
    from ..training.memory_probe import measure_stage, optimizer_facts
    from .predict import step_time

    if widths is not None:
        raise PlanError(f"hvdtrain plan --auto chooses layouts of one chain of stages; hvdtrain {name} "
                        "sets its own stage widths: give its layout by hand")
    per_pass = cfg.optim.per_pass
    models: dict[tuple[int, int], Optional[_Model]] = {}
    facts: dict[tuple[int, int, int, int, str], Any] = {}
    times: dict[tuple[int, int, int, int, str], StageTime] = {}
    opt_facts: Any = None
    per_element = 0.0
    threads = max(1, cores // max(1, ranks_per_host))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    results, seen, refused = [], 0, 0
    try:  # the model's own build refuses more stages than it has layers, and its recompute check
        # `selective` without attention: such choices count as refused
        for c in choices(np_, per_pass, layers=np_ * 2, tensor_ok=tensor_parallel,
                         attention=True, max_microbatches=max(8, cfg.pipeline.microbatches)):
            seen += 1
            try:
                cc = cfg.resolved(tensor=c.tensor, stages=c.stages, bundle_shape=None,
                                  stages_per_rank=c.stages_per_rank, placement="auto", schedule=c.schedule,
                                  microbatches=c.microbatches, zero=c.zero, recompute=c.recompute)
                p = cc.parallel
                layout = p.layout(np_, default_widths)
                check_batch(cc, layout)
                n = p.model_stages(layout)
                key = (n, c.tensor)
                if key not in models:
                    models[key] = _build(build, n, layout, say)
                m = models[key]
                if m is None:
                    continue
                Recompute.parse(c.recompute).check(n, m.built.attention, f"hvdtrain {name}", False)
                placement = p.placement_for(layout, c.schedule) or Placement.identity(n)
                plans = sched.build(c.schedule, m.model.graph, c.microbatches, placement,
                                    batch_w=cc.pipeline.weights_per_w())
            except USER_ERRORS:
                refused += 1
                continue
            rows = per_pass // (c.bundles * c.microbatches)
            batch = m.built.train_set.batch(list(range(rows)))
            mode = Recompute.parse(c.recompute)
            for s in range(n):
                k = (n, c.tensor, s, rows, mode.mode_of(s))
                if k not in facts:
                    try:
                        facts[k] = measure_stage(m.model, m.modules, s, batch, k[4], cfg.run.seed, rows=rows)
                        times[k] = time_stage(m.model, m.modules, s, batch, k[4], rows, m.comm,
                                              seed=cfg.run.seed)
                    except Exception as e:  # a stage that cannot run here: say which, and why
                        raise PlanError(f"hvdtrain plan --auto could not measure stage {s} of {n} of "
                                        f"hvdtrain {name} at {rows} rows ({type(e).__name__}: {e})") from None
            if opt_facts is None:
                opt_facts = optimizer_facts(m.built.optimizer_fn)
                per_element = optimizer_time(m.built.optimizer_fn)
            f = {s: facts[(n, c.tensor, s, rows, mode.mode_of(s))] for s in range(n)}
            figs = position_figures(layout, placement, plans, f, tie_sizes(m.model, m.modules), opt_facts,
                                    c.zero)
            memory = max(r["parameters"] + r["gradients"] + r["optimizer"] + r["activations_peak"]
                         for r in figs) + rest
            t = {s: times[(n, c.tensor, s, rows, mode.mode_of(s))] for s in range(n)}
            elements = [sum(f[s].params for s in placement.stages_on(pos))
                        for pos in range(layout.num_stages)]
            out = max((t[s].out_bytes for s in t), default=0) * c.microbatches * c.bundles
            sizes = ModelSizes(tuple(4.0 * e for e in elements),  # looped stages cross more boundaries
                               out * max(1, n - 1) / max(1, layout.num_stages - 1), cfg.comm.fp16_compression)
            for map_by, placed in (hosts or {"": []}).items():
                cm = dataclasses.replace(c, map_by=map_by)
                pred = step_time(cm, m.model.graph, placement, plans, t, link, elements, per_element,
                                 ranks_per_host, cores, cfg.comm.fp16_compression, allreduce, remote=remote,
                                 hosts=placed, layout=layout, crowd=crowd)
                results.append({"choice": cm, "options": cm.options(), "describe": cm.describe(),
                                "map_by": map_by, **pred.as_dict(), "memory": memory, "positions": figs,
                                "links": [[a, b, v] for (a, b), v in
                                          link_bytes(layout, placed or ["this host"] * np_, sizes).items()],
                                "costs": {"stages": {str(s): dataclasses.asdict(t[s]) for s in t},
                                          "split_w": c.schedule in ("zb1", "zbv", "vhalf"),
                                          "link": dataclasses.asdict(link)},
                                "fits": max_memory is None or memory <= max_memory})
    finally:
        torch.set_num_threads(old_threads)
    if not results:
        raise PlanError(f"hvdtrain plan --auto: none of the {seen} layouts of {np_} ranks fits hvdtrain "
                        f"{name} "
                        f"({refused} refused by the batch, the stages or the schedule); try another -np or "
                        "--batch-size")
    results.sort(key=lambda r: r["step_s"])
    fits = [r for r in results if r["fits"]]
    if not fits:
        least = min(results, key=lambda r: r["memory"])
        raise PlanError(f"no layout of {np_} ranks fits --max-memory {_mb(max_memory or 0)} per rank; the "
                        f"least memory is {_mb(least['memory'])} ({least['describe']}): raise "
                        f"--max-memory to it or use more ranks")
    return {"model": name, "np": np_, "layouts": len(results), "fit": len(fits), "ranked": fits,
            "too_big": len(results) - len(fits), "link": dataclasses.asdict(link), "cores": cores,
            "remote": dataclasses.asdict(remote) if remote is not None else None,
            "ranks_per_host": ranks_per_host, "rest": rest, "crowd": crowd}


def _build(build: Callable[[int, Any], Any], n: int, layout: Any,
           say: Callable[[str], None]) -> Optional[_Model]:
    """The model cut into ``n`` stages at ``layout``'s tensor size (None: it has fewer layers)."""
    import torch

    from ..parallel.staged import StagedModel

    try:
        built = build(n, layout)
    except USER_ERRORS:
        return None
    if built.slices is not None:
        raise PlanError("hvdtrain plan --auto plans whole sequences; drop --slices (hvdtrain gpt plan-slices "
                        "chooses slices)")
    comm = CountingComm(layout.tensor, 0)
    model = built.model if isinstance(built.model, StagedModel) else built.model(SimpleNamespace(tensor=comm))
    say(f"measuring {n} stage(s) at tensor {layout.tensor}")
    torch.manual_seed(0)
    return _Model(built, model, comm, {})


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f} MB"

