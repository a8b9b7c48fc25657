"""``--layout auto`` in a run: :func:`choose_layout` (``hvdtrain plan --auto`` is
:func:`hvdhybrid.cli.plan_auto.plan_auto`)."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["choose_layout"]


def _say(message: str) -> None:
    import sys

    print(f"[rank 0] {message}", file=sys.stderr, flush=True)


def choose_layout(name: str, cfg: Any, comm: Any, default_widths: tuple[int, ...], widths: Any, build: Any,
                  tensor_parallel: bool, say: Callable[[str], None] = _say) -> tuple[Any, dict[str, Any]]:
    """``--layout auto`` in a run: rank 0 weighs every layout of the world (the others wait), every rank
    takes its choice; returns the config with it set (``--layout manual`` from then on) and the plan
    (what ``plan.json`` in the run's directory keeps). Collective over ``comm``."""
    from ..errors import InputError
    from ..training.device import local_size
    from ..training.memory import peak_rss
    from .links import probe, sleep_barrier

    got: dict[str, Any] = {}
    local_ranks = local_size()
    rest = peak_rss()  # the libraries at rest, before the probe's own tensors raise the high-water mark
    figures: dict[str, Any] = {"latency": 1e-6, "bandwidth": 1e10}
    if comm.Get_size() > 1:
        figures = probe(comm) or {}
    figures["rest"] = rest
    if comm.Get_rank() == 0:
        try:
            got = _plan_here(name, cfg, comm, default_widths, widths, build, tensor_parallel, local_ranks,
                             figures, say)
        except Exception as e:  # every rank raises it (one line), none waits for a plan that never comes
            got = {"error": str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}"}
    sleep_barrier(comm)  # the other ranks sleep while rank 0 measures: it needs the cores
    got = comm.bcast(got, root=0)
    if "error" in got:
        from .search import PlanError

        raise PlanError(got["error"])
    from .space import Choice

    return cfg.resolved(layout_choice="manual", **Choice(**got["chosen"]["settings"]).knobs()), got


def _plan_here(name: str, cfg: Any, comm: Any, default_widths: tuple[int, ...], widths: Any, build: Any,
               tensor_parallel: bool, local_ranks: int, figures: Any, say: Callable[[str], None]
               ) -> dict[str, Any]:
    """Rank 0's part of :func:`choose_layout`: the search, and what plan.json keeps of it."""
    import dataclasses

    from ..training.device import usable_cores
    from .links import network
    from .render import parse_bytes
    from .search import search

    p = cfg.parallel
    limit = parse_bytes(p.max_memory) if p.max_memory is not None else None
    base = cfg.resolved(layout_choice="manual")
    say(f"--layout auto: weighing every layout of {comm.Get_size()} ranks on costs measured here")
    assert figures is not None
    names = list(figures.get("hosts", []))  # measured between this job's own ranks, on their hosts
    net = network(figures, usable_cores(), local_ranks, {"": names} if len(set(names)) > 1 else None)
    got = search(name, base, comm.Get_size(), default_widths, widths, build, tensor_parallel, net,
                 max_memory=limit, rest=figures["rest"], say=say)
    best = got["ranked"][0]
    got = {**{k: v for k, v in got.items() if k != "ranked"},
           "chosen": {**{k: v for k, v in best.items() if k != "choice"},
                      "settings": dataclasses.asdict(best["choice"])},
           "next": [{k: v for k, v in r.items() if k not in ("choice", "positions")}
                    for r in got["ranked"][1:5]]}
    say(f"--layout auto chose {' '.join(got['chosen']['options'])}: predicted "
        f"{got['chosen']['step_s']:.4f} s/step, {got['chosen']['memory'] / 2**20:.0f} MB per rank")
    return got
