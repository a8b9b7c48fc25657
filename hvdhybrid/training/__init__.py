"""Training: the loop, the engine under it, gradient sync, evaluation, state and checkpoints.

    trainer      Trainer: the loop (fit, or train_step from your own loop)
    engine       Engine: what one rank built (stages, executor, plans, row and batch functions)
    gradsync     gradient averaging over rows, ties and bundles; the global-norm guard
    evaluation   forward-only evaluation and prediction over every held-out row
    checkpointing  save, resume (resharded into any layout) and gather the training state
    state        training state by full name: what a checkpoint holds, reading it into any layout
    checkpoint   checkpoint files: atomic writes, manifest, latest pointer
    precision    fp32 / bf16 / fp16 autocast and the dynamic loss scaler
    lr_schedule  warmup and constant / linear / cosine decay
    data         data sets as index -> rows, and the sampler every rank computes alike
    job          the Job a build function hands `hvdtrain run`
    device, metrics, stopping, faults   this rank's device; metrics; stop signals; fault injection
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports

__all__ = ["CheckpointError", "DataError", "Dataset", "Diverged", "Engine", "Job", "Precision", "Sampler",
           "TensorDataset", "Trainer"]

if TYPE_CHECKING:
    from .checkpoint import CheckpointError
    from .data import DataError, Dataset, Sampler, TensorDataset
    from .engine import Engine
    from .job import Job
    from .precision import Precision
    from .trainer import Diverged, Trainer

__getattr__ = exports(__name__, {
    "Trainer": "trainer", "Diverged": "trainer", "Engine": "engine", "Dataset": "data",
    "TensorDataset": "data", "Sampler": "data", "DataError": "data", "Job": "job", "Precision": "precision",
    "CheckpointError": "checkpoint",
})
