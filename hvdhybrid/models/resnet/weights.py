"""``--init FILE``: a torchvision-format state dict, checked against the model by name and shape.

The file is what ``torch.save(model.state_dict(), FILE)`` writes for a torchvision
ResNet (or for one built here): tensors by torchvision's names. It is checked
once, in full, before any rank builds a stage; then each rank copies in the
tensors of its own stages (the file is memory-mapped where its format allows,
so a rank touches only those). Read offline: nothing is downloaded.

What is forgiven, and said: BatchNorm statistics in the file when the model uses
GroupNorm (``--norm group`` has none); a classifier head (``fc``) for another
number of classes (kept freshly initialised, as fine-tuning from ImageNet
weights does). Anything else that does not match is an :class:`InitError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import InputError

__all__ = ["InitError", "InitFile"]

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
HEAD = ("fc.weight", "fc.bias")


class InitError(InputError):
    """An ``--init`` file that cannot be read or does not fit the model."""


def _examples(names: list[str]) -> str:
    return ", ".join(sorted(names)[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


@dataclass
class InitFile:
    """The checked tensors of an ``--init`` file: which to copy, and what was left out and why."""

    path: str
    tensors: dict[str, torch.Tensor]
    #: one line per thing forgiven (for the log)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: str, model: dict[str, torch.Tensor], what: str) -> "InitFile":
        """Read ``path`` and check it against ``model`` (full name -> tensor or meta tensor) of ``what``.

        Raises:
            InitError: a missing or unreadable file, not a state dict, names the model lacks or
                has alone, a shape that differs (but the head's classes), named with the fix.
        """
        sd = _load(path)
        notes: list[str] = []
        stats = [n for n in sd if n not in model and n.rsplit(".", 1)[-1] in STATISTICS]
        if stats and not any(n.endswith(".running_mean") for n in model):
            notes.append(f"{len(stats)} BatchNorm statistics in {path} not used: the model uses "
                         "GroupNorm (--norm batch uses them)")
            sd = {n: t for n, t in sd.items() if n not in stats}
        extra = [n for n in sd if n not in model]
        missing = [n for n in model if n not in sd]
        if extra or missing:
            parts = [f"has {len(extra)} tensor(s) the model lacks ({_examples(extra)})"] if extra else []
            parts += [f"lacks {len(missing)} of the model's ({_examples(missing)})"] if missing else []
            stats_only = not extra and all(n.rsplit(".", 1)[-1] in STATISTICS for n in missing)
            fix = ("the file has no BatchNorm statistics: use --norm group" if stats_only else
                   "give a file saved from this architecture")
            raise InitError(f"--init {path} does not fit {what}: it {' and '.join(parts)}; {fix}")
        head = [n for n in HEAD if n in sd and sd[n].shape != model[n].shape]
        if head and sd["fc.weight"].shape[1:] == model["fc.weight"].shape[1:]:
            notes.append(f"{path} has a head for {sd['fc.weight'].shape[0]} classes, the data "
                         f"{model['fc.weight'].shape[0]}: fc is freshly initialised")
            sd = {n: t for n, t in sd.items() if n not in head}
        for n, t in sd.items():
            if t.shape != model[n].shape:
                hint = (f"; the data has {model[n].shape[1]} image channel(s)" if n == "conv1.weight"
                        else "; give the file of this architecture")
                raise InitError(f"--init {path}: {n} has shape {tuple(t.shape)}, the model "
                                f"{tuple(model[n].shape)}{hint}")
        return cls(path, sd, notes)

    def load_into(self, module: nn.Module) -> nn.Module:
        """Copy the file's tensors into ``module``'s parameters and buffers of the same full names."""
        with torch.no_grad():
            for name, t in list(module.named_parameters()) + list(module.named_buffers()):
                if name in self.tensors:
                    t.copy_(self.tensors[name])
        return module


def _load(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise InitError(f"--init {path}: no such file; give a state dict saved with "
                        "torch.save(model.state_dict(), FILE)")
    try:
        try:
            obj: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # an old (not zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise InitError(f"--init {path} cannot be read as a PyTorch state dict "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not obj or not all(isinstance(t, torch.Tensor) for t in obj.values()):
        raise InitError(f"--init {path} is not a state dict (a dict of tensors by name); save one with "
                        "torch.save(model.state_dict(), FILE)")
    # a state dict saved from a DistributedDataParallel wrapper carries a "module." prefix
    if all(n.startswith("module.") for n in obj):
        obj = {n[len("module."):]: t for n, t in obj.items()}
    out: dict[str, torch.Tensor] = obj
    return out
