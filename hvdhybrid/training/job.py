"""``hvdtrain run TARGET``: train a model from any importable build function.

``TARGET`` is ``pkg.module:build_fn`` or ``path/to/file.py:build_fn``. The
function is called on every rank as ``build_fn(stages=K, **args)`` (``K``: the
number of pipeline stages the launch asks for; ``args``: the ``--arg KEY=VALUE``
strings) and returns a :class:`Job`. Everything else is the common options:
layouts, schedules, precision, accumulation, clipping, LR schedule,
checkpoints, resume, bundles and fp16 compression.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import InputError

__all__ = ["Job", "JobError", "load_target", "call_build"]

MetricFn = Callable[[Any, Any], tuple[float, int]]


class JobError(InputError):
    """A target that cannot be imported or called, or that returns something unusable."""


@dataclass
class Job:
    """What a build function hands to ``hvdtrain run``.

    Args:
        model: a :class:`~hvdhybrid.parallel.staged.StagedModel` with exactly ``stages``
            stages, or a list of layer factories (``() -> nn.Module``): the
            runtime cuts them into stages (``--partition``) and builds each
            layer under a generator keyed by (``--seed``, layer index).
        train_set: rows to train on (``len`` and ``batch(indices) -> (inputs, targets)``).
        loss_fn: ``(output, targets) -> mean loss``, for a list of layers
            (default: cross entropy); a StagedModel brings its own.
        optimizer: ``params -> optimizer`` (default: AdamW at ``--lr``).
        eval_set: held-out rows, evaluated after training.
        metric: ``(output, targets) -> (sum over rows, rows)`` on ``eval_set``
            (default: accuracy of the arg-max).
    """

    model: Any
    train_set: Any
    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None
    optimizer: Optional[Callable[[Any], torch.optim.Optimizer]] = None
    eval_set: Any = None
    metric: Optional[MetricFn] = None


def _import_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise JobError(f"{path}: no such file; pass path/to/file.py:function or pkg.module:function")
    name = f"hvdhybrid_user_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_target(target: str) -> Callable[..., Any]:
    """The function named by ``pkg.module:function`` or ``file.py:function``, or one JobError."""
    where, sep, fn = target.rpartition(":")
    if not sep or not where or not fn:
        raise JobError(f"run target {target!r} is not MODULE:FUNCTION; pass e.g. mypkg.train:build "
                       "or path/to/file.py:build")
    if where.endswith(".py"):
        mod = _import_file(where)
    else:
        try:
            mod = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise JobError(f"cannot import {where!r} ({e}); put its directory on PYTHONPATH (with "
                           "mpirun: -x PYTHONPATH) or pass path/to/file.py:function") from None
    got = getattr(mod, fn, None)
    if not callable(got):
        names = sorted(n for n, v in vars(mod).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise JobError(f"{where} has no function {fn!r}; its functions: {', '.join(names) or 'none'}")
    return got  # type: ignore[no-any-return]


def parse_args(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k.isidentifier():
            raise JobError(f"--arg {p!r} is not KEY=VALUE with KEY a Python name")
        out[k] = v
    return out


def call_build(fn: Callable[..., Any], stages: int, args: dict[str, str]) -> Job:
    """``fn(stages=stages, **args)``, checked: a :class:`Job` with a usable model."""
    try:
        inspect.signature(fn).bind(stages=stages, **args)
    except TypeError as e:
        raise JobError(f"{fn.__name__}(stages={stages}, {', '.join(args)}) does not fit its signature "
                       f"{inspect.signature(fn)} ({e}); give it a stages parameter and the --arg "
                       "names") from None
    job = fn(stages=stages, **args)
    if not isinstance(job, Job):
        raise JobError(f"{fn.__name__} returned {type(job).__name__}, not hvdhybrid.Job")
    return job


def layers_or_model(job: Job) -> Union[Sequence[Callable[[], nn.Module]], Any]:
    from ..parallel.staged import StagedModel

    if isinstance(job.model, StagedModel):
        return job.model
    if isinstance(job.model, (list, tuple)) and job.model and all(callable(f) for f in job.model):
        if any(isinstance(f, nn.Module) for f in job.model):
            raise JobError("Job.model holds modules; give layer factories (lambda: nn.Linear(...)) so that "
                           "each rank builds only its own stages")
        return list(job.model)
    raise JobError(f"Job.model is {type(job.model).__name__}; give a StagedModel or a list of layer "
                   "factories")
