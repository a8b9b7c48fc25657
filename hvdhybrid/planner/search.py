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
from ..layout.rows import replica_rows
from ..layout.traffic import ModelSizes, link_bytes
from .links import Network
from .probe import CountingComm, StageTime, optimizer_time, time_stage
from .render import mb
from .space import Choice, choices

__all__ = ["PlanError", "search"]


class PlanError(ConfigError):
    """Nothing fits (with what would), or the model's costs cannot be measured here."""


@dataclasses.dataclass
class _Model:
    built: Any
    model: Any
    comm: CountingComm
    modules: dict[int, Any]


@dataclasses.dataclass
class _Layout:
    """A choice made concrete: its config, layout, model stages and the plan of every position."""

    cfg: Config
    layout: Any
    n: int
    model: _Model
    placement: Placement
    plans: Any


def search(name: str, cfg: Config, np_: int, default_widths: tuple[int, ...],
           widths: Optional[tuple[int, ...]], build: Callable[[int, Any], Any], tensor_parallel: bool,
           net: Network, max_memory: Optional[int] = None, rest: int = 0,
           say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """The ranked layouts for ``np_`` ranks of model command ``name`` (what :func:`session.run_model`
    handed the planner) on the machines of ``net``. ``rest``: bytes a rank holds beyond what the
    accounting counts (the interpreter and libraries), added to each prediction; ``max_memory``: the
    per-rank limit.

    Raises:
        PlanError: a model with its own stage widths (GROVER's task branches), nothing fits the limit,
            or a stage cannot be measured.
    """
    import torch

    if widths is not None:
        raise PlanError(f"hvdtrain plan --auto chooses layouts of one chain of stages; hvdtrain {name} "
                        "sets its own stage widths: give its layout by hand")
    costs = _Costs(name, cfg, build, say)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, net.cores // max(1, net.ranks_per_host)))
    results, seen, refused = [], 0, 0
    try:
        for c in choices(np_, cfg.optim.per_pass, layers=np_ * 2, tensor_ok=tensor_parallel, attention=True,
                         max_microbatches=max(8, cfg.pipeline.microbatches)):
            seen += 1
            lay = costs.concrete(c, np_, default_widths)
            if lay is None:
                refused += 1
                continue
            results += _weigh(c, lay, costs, net, np_, rest, max_memory)
    finally:
        torch.set_num_threads(old_threads)
    if not results:
        raise PlanError(f"hvdtrain plan --auto: none of the {seen} layouts of {np_} ranks fits hvdtrain "
                        f"{name} ({refused} refused by the batch, the stages or the schedule); try another "
                        "-np or --batch-size")
    results.sort(key=lambda r: r["step_s"])
    fits = [r for r in results if r["fits"]]
    if not fits:
        least = min(results, key=lambda r: r["memory"])
        raise PlanError(f"no layout of {np_} ranks fits --max-memory {mb(max_memory or 0)} MB per rank; the "
                        f"least memory is {mb(least['memory'])} MB ({least['describe']}): raise "
                        f"--max-memory to it or use more ranks")
    return {"model": name, "np": np_, "layouts": len(results), "fit": len(fits), "ranked": fits,
            "too_big": len(results) - len(fits), "link": dataclasses.asdict(net.link), "cores": net.cores,
            "remote": dataclasses.asdict(net.remote) if net.remote is not None else None,
            "ranks_per_host": net.ranks_per_host, "rest": rest, "crowd": net.crowd}


class _Costs:
    """What the search measures, once each: the model per (model stages, tensor size), each stage's
    memory facts and times per (rows, recomputation mode), the optimizer's."""

    def __init__(self, name: str, cfg: Config, build: Callable[[int, Any], Any],
                 say: Callable[[str], None]) -> None:
        self.name, self.cfg, self.build, self.say = name, cfg, build, say
        self.models: dict[tuple[int, int], Optional[_Model]] = {}
        self.stages: dict[tuple[int, int, int, int, str], tuple[Any, StageTime]] = {}
        self.optimizer: Optional[tuple[Any, float]] = None

    def concrete(self, c: Choice, np_: int, default_widths: tuple[int, ...]) -> Optional[_Layout]:
        """``c`` as the run would take it, or None where the batch, the model's stages, its recompute
        check (``selective`` without attention), its ties (stage groups of one width) or the schedule
        refuse it."""
        from ..parallel.recompute import Recompute
        from ..pipeline import schedules as sched

        try:
            cc = self.cfg.resolved(**c.knobs())
            p = cc.parallel
            layout = p.layout(np_, default_widths)
            check_batch(cc, layout)
            n = p.model_stages(layout)
            if (n, c.tensor) not in self.models:
                self.models[(n, c.tensor)] = _build(self.build, n, layout, self.say)
            m = self.models[(n, c.tensor)]
            if m is None:
                return None
            Recompute.parse(c.recompute).check(n, m.built.attention, f"hvdtrain {self.name}", False)
            placement = p.placement_for(layout, c.schedule) or Placement.identity(n)
            if any(len({layout.widths[q] for q in placement.groups_of(t.stages)}) > 1 for t in m.model.ties):
                return None  # the run refuses a tie between stage groups of different widths
            plans = sched.build(c.schedule, m.model.graph, c.microbatches, placement,
                                batch_w=cc.pipeline.weights_per_w())
        except USER_ERRORS:
            return None
        return _Layout(cc, layout, n, m, placement, plans)

    def stage(self, lay: _Layout, s: int, rows: int, mode: str) -> tuple[Any, StageTime]:
        """Stage ``s``'s memory facts and times at ``rows`` rows per microbatch under ``mode``."""
        from ..training.memory_probe import measure_stage

        key = (lay.n, lay.layout.tensor, s, rows, mode)
        if key not in self.stages:
            m, seed = lay.model, self.cfg.run.seed
            def fetch() -> Any:  # the rows of one microbatch, as the executor takes them
                return m.built.train_set.batch(list(range(rows)))

            batch = fetch()
            try:
                self.stages[key] = (measure_stage(m.model, m.modules, s, batch, mode, seed, rows=rows),
                                    time_stage(m.model, m.modules, s, batch, mode, rows, m.comm, seed=seed,
                                               fetch=fetch))
            except Exception as e:  # a stage that cannot run here: say which, and why
                raise PlanError(f"hvdtrain plan --auto could not measure stage {s} of {lay.n} of hvdtrain "
                                f"{self.name} at {rows} rows ({type(e).__name__}: {e})") from None
        return self.stages[key]

    def optimizer_costs(self, m: _Model) -> tuple[Any, float]:
        """The optimizer's state per element and its step's seconds per element."""
        from ..training.memory_probe import optimizer_facts

        if self.optimizer is None:
            self.optimizer = (optimizer_facts(m.built.optimizer_fn), optimizer_time(m.built.optimizer_fn))
        return self.optimizer


def _weigh(c: Choice, lay: _Layout, costs: _Costs, net: Network, np_: int, rest: int,
           max_memory: Optional[int]) -> list[dict[str, Any]]:
    """``c``'s memory per rank and predicted step, once per way its ranks may be put on the hosts."""
    from ..parallel.recompute import Recompute
    from ..training.memory_plan import position_figures, tie_sizes
    from .predict import step_time

    layout, placement, m, n = lay.layout, lay.placement, lay.model, lay.n
    mode = Recompute.parse(c.recompute)

    def rows(s: int) -> int:  # the rows of one microbatch on the first replica of the stage's group
        lo, hi = replica_rows(lay.cfg.optim.per_pass, c.bundles, 0, c.microbatches, 0,
                              layout.widths[placement.position_of(s)], 0)
        return hi - lo
    got = {s: costs.stage(lay, s, rows(s), mode.mode_of(s)) for s in range(n)}
    f = {s: got[s][0] for s in got}
    t = {s: got[s][1] for s in got}
    opt_facts, per_element = costs.optimizer_costs(m)
    figs = position_figures(layout, placement, lay.plans, f, tie_sizes(m.model, m.modules), opt_facts, c.zero)
    memory = rest + max(r["parameters"] + r["gradients"] + r["optimizer"] + r["activations_peak"]
                        for r in figs)
    elements = [sum(f[s].params for s in placement.stages_on(pos)) for pos in range(layout.num_stages)]
    out = max((t[s].out_bytes for s in t), default=0) * c.microbatches * c.bundles
    fp16 = lay.cfg.comm.fp16_compression
    sizes = ModelSizes(tuple(4.0 * e for e in elements),  # looped stages cross more boundaries
                       out * max(1, n - 1) / max(1, layout.num_stages - 1), fp16)
    rows_out = []
    for map_by, placed in (net.hosts or {"": []}).items():
        cm = dataclasses.replace(c, map_by=map_by)
        pred = step_time(cm, m.model.graph, placement, lay.plans, t, net.link, elements, per_element,
                         net.ranks_per_host, net.cores, fp16, net.allreduce, remote=net.remote, hosts=placed,
                         layout=layout, crowd=net.crowd)
        rows_out.append({"choice": cm, "options": cm.options(), "describe": cm.describe(), "map_by": map_by,
                         **pred.as_dict(), "memory": memory, "positions": figs,
                         "links": [[a, b, v] for (a, b), v in
                                   link_bytes(layout, placed or ["this host"] * np_, sizes).items()],
                         "costs": {"stages": {str(s): dataclasses.asdict(t[s]) for s in t},
                                   "split_w": c.schedule in ("zb1", "zbv", "vhalf"),
                                   "link": dataclasses.asdict(net.link)},
                         "fits": max_memory is None or memory <= max_memory})
    return rows_out


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
