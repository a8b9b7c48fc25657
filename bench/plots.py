"""PNG plots of benchmark results: a pipeline timeline from a ``--trace`` file, and a scaling chart.

    python bench/plots.py timeline TRACE.json OUT.png
    python bench/plots.py scaling RESULTS.json OUT.png
"""

from __future__ import annotations

import json
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"F": "#4c78a8", "B": "#f58518", "W": "#54a24b", "sync": "#b279a2", "optimizer": "#9d755d"}


def timeline(trace_path: str, out: str, steps: int = 2) -> int:
    """One row per rank: its actions in time (F blue, B orange, W green, sync and optimizer), the
    last ``steps`` optimizer steps of the trace. Returns the number of events drawn."""
    ev = json.load(open(trace_path))["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in ev if e.get("name") == "process_name"}
    spans = [e for e in ev if e["ph"] == "X"]
    first = min(names)
    ends = sorted(e["ts"] + e["dur"] for e in spans if e["cat"] == "optimizer" and e["pid"] == first)
    start = ends[-steps - 1] if len(ends) > steps else 0.0
    shown = [e for e in spans if e["ts"] >= start]
    ranks = sorted(names)
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(ranks) + 1.2))
    for i, r in enumerate(ranks):
        for e in (e for e in shown if e["pid"] == r):
            x, w = (e["ts"] - start) / 1e3, e["dur"] / 1e3
            ax.broken_barh([(x, w)], (i - 0.4, 0.8), color=COLORS.get(e["cat"], "#999999"))
            if w > 0.02 * max(1.0, (max(s["ts"] + s["dur"] for s in shown) - start) / 1e3):
                ax.text(x + w / 2, i, e["name"], ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(len(ranks)), [names[r] for r in ranks], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(f"what every rank ran, last {steps} steps")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return len(shown)


def scaling(results: list[dict[str, Any]], out: str) -> None:
    """Speedup over the run's own baseline for every benchmark row that has ``speedup`` and ``label``."""
    rows = [r for r in results if "speedup" in r and "label" in r]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [r["speedup"] for r in rows], color="#4c78a8")
    for i, r in enumerate(rows):
        ax.text(r["speedup"], i, f" {r['speedup']:.2f}x", va="center", fontsize=8)
        if "ideal" in r:
            ax.plot([r["ideal"], r["ideal"]], [i - 0.4, i + 0.4], color="black", lw=1)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("speedup against the peer in the same run (black tick: ideal)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    what, src, dst = sys.argv[1:4]
    if what == "timeline":
        print(timeline(src, dst), "events drawn")
    else:
        scaling(json.load(open(src)), dst)
