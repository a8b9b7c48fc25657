"""What ``hvdtrain plan --auto`` prints: the best few layouts, and why the winner wins."""

from __future__ import annotations

import re
from typing import Any

from ..config import ConfigError
from ..layout.traffic import describe_links

__all__ = ["mb", "parse_bytes", "render"]

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """``2GB``, ``1500MB``, ``3GiB`` or a number of bytes.

    Raises:
        ConfigError: not a size (one line, with examples).
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"--max-memory {text!r} is not a size; give bytes per rank, e.g. 2GB, 1500MB or "
                          "3GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def mb(n: float) -> str:
    """Bytes as whole MiB (as the runs log them)."""
    return f"{n / 2**20:.0f}"


def _parts(r: dict[str, Any]) -> str:
    return (f"pipeline {r['pipeline_s']:.3f} s, average across bundles {r['reduce_s']:.3f} s, "
            f"optimizer {r['optimizer_s']:.3f} s")


def render(got: dict[str, Any], top: int = 5) -> str:
    """The ranked layouts as a table (fastest first), the winner's options and why it wins."""
    ranked = got["ranked"]
    link = got["link"]
    lines = [f"hvdtrain plan --auto: {got['layouts']} layouts of {got['np']} ranks weighed for hvdtrain "
             f"{got['model']} ({got['too_big']} over --max-memory); costs measured here: "
             f"{got['cores']} core(s), {got['ranks_per_host']} rank(s) per host, link "
             f"{link['latency'] * 1e6:.1f} us + {link['bandwidth'] / 1e9:.2f} GB/s"
             + (f", between hosts {got['remote']['latency'] * 1e6:.1f} us + "
                f"{got['remote']['bandwidth'] / 1e9:.3f} GB/s" if got.get("remote") else ""),
             f"{'#':>3} {'s/step':>8} {'MB/rank':>8}  layout"]
    for i, r in enumerate(ranked[:top]):
        lines.append(f"{i + 1:>3} {r['step_s']:>8.4f} {mb(r['memory']):>8}  {r['describe']}")
    best = ranked[0]
    launch = f" (launch with --map-by {best['map_by']})" if best.get("map_by") else ""
    lines.append(f"chosen: {' '.join(best['options'])}{launch}")
    lines.append(f"  predicted {best['step_s']:.4f} s/step ({_parts(best)}), at most "
                 f"{mb(best['memory'])} MB per rank")
    if best.get("links"):  # activations and gradients; a tensor group's collectives are not counted
        shown = describe_links({(a, b): v for a, b, v in best["links"]})
        lines.append(f"  bytes per step: {'; '.join(shown)}")
    if len(ranked) > 1:
        nxt = ranked[1]
        lines.append(f"  next best {nxt['step_s']:.4f} s/step ({nxt['describe']}): {_parts(nxt)}")
    plain = [r for r in ranked if r["choice"].stages == 1 and r["choice"].tensor == 1
             and r["choice"].zero == 0 and r["choice"].recompute == "none"]
    if plain and plain[0] is not best:
        p = min(plain, key=lambda r: r["step_s"])
        lines.append(f"  plain data parallel would take {p['step_s']:.4f} s/step "
                     f"({p['step_s'] / best['step_s']:.2f}x), {mb(p['memory'])} MB per rank")
    return "\n".join(lines)
