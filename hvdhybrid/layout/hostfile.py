"""Hostfiles: parse and check Open MPI / horovodrun hostfiles (``host slots=N`` lines)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError

__all__ = ["HostfileError", "Host", "parse_hostfile", "read_hostfile", "place_ranks"]


class HostfileError(InputError):
    """A hostfile line that neither mpirun nor horovodrun would take, named by file and line."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.\-_]*[A-Za-z0-9])?$")
_LINE = re.compile(r"^(?P<host>\S+)(?:\s+slots\s*=\s*(?P<slots>\S+))?"
                   r"(?:\s+max_slots\s*=\s*(?P<max>\S+))?\s*$")


def parse_hostfile(text: str, path: str = "<hostfile>") -> list[Host]:
    """Parse ``host [slots=N]`` lines; ``#`` starts a comment, blank lines are skipped.

    Raises:
        HostfileError: ``path:line: what is wrong; what to write instead``.
    """
    hosts: list[Host] = []
    seen: set[str] = set()
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        where = f"{path}:{no}"
        if m is None or ":" in line:
            raise HostfileError(f"{where}: cannot read {raw.strip()!r}; write one host per line "
                                "as 'HOSTNAME slots=N' (not 'host:N')")
        name, slots_text = m.group("host"), m.group("slots")
        if not _HOST.match(name):
            raise HostfileError(f"{where}: {name!r} is not a host name; write 'HOSTNAME slots=N'")
        slots = 1
        if slots_text is not None:
            if not re.fullmatch(r"[0-9]{1,6}", slots_text) or int(slots_text) < 1:
                raise HostfileError(f"{where}: slots={slots_text} must be a positive integer")
            slots = int(slots_text)
        if name in seen:
            raise HostfileError(f"{where}: host {name!r} is listed twice; give it one line with "
                                "the total slots")
        seen.add(name)
        hosts.append(Host(name, slots))
    if not hosts:
        raise HostfileError(f"{path}: no hosts; write one line per host as 'HOSTNAME slots=N'")
    return hosts


def read_hostfile(path: str) -> list[Host]:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise HostfileError(f"cannot read hostfile {path}: {e.strerror}") from None
    return parse_hostfile(text, path)


MAP_BY = ("slot", "node")


def place_ranks(hosts: list[Host], np_: int, map_by: str = "slot") -> list[str]:
    """Host of every rank under mpirun's ``--map-by slot`` (default: fill each host's slots in
    turn, so a bundle's consecutive ranks share a host) or ``--map-by node`` (one rank per host
    in turn, so a bundle's stages land on different hosts).

    Raises:
        HostfileError: when the hostfile has fewer slots than ``np_``, or ``map_by`` is unknown.
    """
    if map_by not in MAP_BY:
        raise HostfileError(f"--map-by {map_by!r}: choose slot (a bundle's stages on one host) or node "
                            "(ranks dealt round-robin over the hosts)")
    total = sum(h.slots for h in hosts)
    if np_ > total:
        raise HostfileError(f"-np {np_} needs {np_} slots but the hostfile has {total} "
                            f"({', '.join(f'{h.name}:{h.slots}' for h in hosts)}); "
                            f"use -np {total} or add slots")
    out: list[str] = []
    if map_by == "slot":
        for h in hosts:
            out += [h.name] * h.slots
        return out[:np_]
    left = {h.name: h.slots for h in hosts}
    while len(out) < np_:
        for h in hosts:
            if left[h.name] and len(out) < np_:
                out.append(h.name)
                left[h.name] -= 1
    return out
