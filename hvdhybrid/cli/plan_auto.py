"""``hvdtrain plan -np N --auto [--max-memory B] [--hostfile F] MODEL ...``: the planner
(:mod:`hvdhybrid.planner`) for a model command, from the command line's words."""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..layout.hostfile import read_hostfile

__all__ = ["plan_auto"]


def plan_auto(command: list[str], np_: int, cli: Any, max_memory: Optional[str] = None,
              hostfile: Optional[str] = None, say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Every layout of ``np_`` ranks for model command ``command`` (as after ``hvdtrain``), ranked by
    predicted step time, those over ``max_memory`` (bytes per rank, e.g. ``"2GB"``) left out.
    ``hostfile``: the ranks' hosts (their cores and the link between them are measured).

    Raises:
        ConfigError (PlanError, LinkError): the command, the limit or the hostfile is wrong, nothing
            fits, or a cost cannot be measured here (one line, with what would fit).
    """
    from ..layout.hostfile import MAP_BY, place_ranks
    from ..planner.links import measure, network
    from ..planner.render import parse_bytes
    from ..planner.search import search
    from ..training.device import usable_cores
    from ..training.memory import peak_rss
    from .plan_memory import run_as_planner

    limit = parse_bytes(max_memory) if max_memory is not None else None
    placed: Optional[dict[str, list[str]]] = None
    if hostfile is not None:
        hosts = read_hostfile(hostfile)  # refuses a file without a host (one line, what to write)
        per_host = min(np_, max(h.slots for h in hosts))
        if len(hosts) > 1:  # ranks dealt onto the hosts each way the launcher can (hvdtrain launch --map-by)
            placed = {m: place_ranks(hosts, np_, m) for m in MAP_BY}
    else:
        per_host = np_
    say(f"measuring the links of {np_} ranks")
    figures = measure(hostfile if placed is not None else None, np_=np_)
    net = network(figures, usable_cores(), per_host, placed)
    got: dict[str, Any] = {}

    def planner(name: str, cfg: Any, default_widths: tuple[int, ...], widths: Any, build: Any,
                tensor_parallel: bool) -> None:
        got.update(search(name, cfg, np_, default_widths, widths, build, tensor_parallel, net,
                          max_memory=limit, rest=peak_rss(), say=say))

    run_as_planner(command, cli, planner)
    return got
