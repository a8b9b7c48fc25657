"""``hvdtrain plan --check RUN``: what ``--layout auto`` predicted for a run (its ``plan.json``) against
what the run measured: the step time (``metrics.jsonl``), and, given the run's ``--trace`` file, the mean
duration of each action kind (F, B, W) and of the step's tail (sync, guard, optimizer)."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any, Optional

from ..config import ConfigError

__all__ = ["check", "render_check"]


def _predicted_kinds(chosen: dict[str, Any]) -> dict[str, float]:
    """Mean seconds of one F, B and W of the chosen layout, over its stages (what predict.step_time
    charged, compute only)."""
    from .probe import StageTime

    stages = [StageTime(**s) for s in chosen["costs"]["stages"].values()]
    split = bool(chosen["costs"]["split_w"])
    out = {"F": statistics.mean(s.forward for s in stages), "B": statistics.mean(s.b(split) for s in stages)}
    if split:
        out["W"] = statistics.mean(s.w() for s in stages)
    return out


def check(run: str, trace_file: Optional[str] = None) -> dict[str, Any]:
    """Predicted against measured for the run in directory ``run``.

    Raises:
        ConfigError: no ``plan.json`` there (the run did not use ``--layout auto``), or an unreadable
            trace (one line).
    """
    path = os.path.join(run, "plan.json")
    if not os.path.exists(path):
        raise ConfigError(f"plan --check {run}: no plan.json there; it is written by a run with --layout "
                          "auto (hvdtrain MODEL --layout auto --out DIR)")
    plan = json.load(open(path))
    chosen = plan["chosen"]
    rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    gaps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows[1:], rows[2:])]
    got: dict[str, Any] = {"layout": " ".join(chosen["options"]), "predicted_step_s": chosen["step_s"],
                           "measured_step_s": statistics.median(gaps) if gaps else None, "kinds": {}}
    pred = _predicted_kinds(chosen)
    trace_file = trace_file or next((os.path.join(run, n) for n in ("trace.json",)
                                     if os.path.exists(os.path.join(run, n))), None)
    if trace_file is not None:
        try:
            data = json.load(open(trace_file))
            events = data["traceEvents"] if isinstance(data, dict) else data
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"plan --check: {trace_file} is not a trace hvdtrain --trace wrote "
                              f"({type(err).__name__})") from None
        durations: dict[str, list[float]] = {}
        for ev in events:
            if ev.get("ph") == "X":
                kind = ev.get("cat") if ev.get("cat") in ("F", "B", "W", "R") else ev.get("name")
                durations.setdefault(str(kind), []).append(float(ev["dur"]) / 1e6)
        for kind, ds in sorted(durations.items()):
            got["kinds"][kind] = {"measured_s": statistics.mean(ds), "count": len(ds),
                                  "predicted_s": pred.get(kind)}
    else:
        got["kinds"] = {k: {"predicted_s": v, "measured_s": None, "count": 0} for k, v in pred.items()}
    got["predicted_parts"] = {k: chosen[k] for k in ("pipeline_s", "reduce_s", "optimizer_s")}
    return got


def render_check(got: dict[str, Any]) -> str:
    m = got["measured_step_s"]
    lines = [f"plan --check: {got['layout']}",
             f"step: predicted {got['predicted_step_s']:.4f} s, measured "
             + (f"{m:.4f} s ({m / got['predicted_step_s']:.2f}x)" if m else "(no steps after the first two)"),
             f"{'action':<10} {'predicted ms':>13} {'measured ms':>12} {'count':>6}"]
    for kind, k in got["kinds"].items():
        p = f"{1e3 * k['predicted_s']:.2f}" if k["predicted_s"] is not None else "-"
        meas = f"{1e3 * k['measured_s']:.2f}" if k["measured_s"] is not None else "-"
        lines.append(f"{kind:<10} {p:>13} {meas:>12} {k['count']:>6}")
    if all(k["measured_s"] is None for k in got["kinds"].values()):
        lines.append("(per action: run with --trace FILE, then plan --check RUN --trace FILE)")
    parts = got["predicted_parts"]
    lines.append(f"predicted parts: pipeline {parts['pipeline_s']:.4f} s, average across bundles "
                 f"{parts['reduce_s']:.4f} s, optimizer {parts['optimizer_s']:.4f} s")
    return "\n".join(lines)
