"""The pipeline: schedules as data, the simulator that proves them, and the executor that runs them.

    actions       the schedule language: Action(stage, F/B/W, microbatch, slice), Plan, the dependency rule
    schedules     named schedules (gpipe, 1f1b, zb1) as per-stage generators, merged and proven
    simulator     merge per-stage lists per stage group; simulate (completeness, deadlock, makespan)
    executor      runs one rank's plan over every stage it holds
    kvcache       SliceCache: keys and values of a sequence's earlier token slices
    token_slices  TeraPipe's planner: where to cut each sequence along its tokens
    trace         --trace: every rank's actions as a Chrome trace
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports

__all__ = ["Action", "Executor", "LatencyModel", "Plan", "SCHEDULES", "ScheduleError", "SliceCache",
           "build", "plan_slices", "simulate"]

if TYPE_CHECKING:
    from .actions import Action, Plan, ScheduleError
    from .executor import Executor
    from .kvcache import SliceCache
    from .schedules import SCHEDULES, build
    from .simulator import simulate
    from .token_slices import LatencyModel, plan_slices

__getattr__ = exports(__name__, {
    "Action": "actions", "Plan": "actions", "ScheduleError": "actions", "SCHEDULES": "schedules",
    "build": "schedules", "simulate": "simulator", "Executor": "executor", "SliceCache": "kvcache",
    "LatencyModel": "token_slices", "plan_slices": "token_slices",
})
