"""A :class:`~hvdhybrid.models.sampling.Sampler` for ``hvdtrain gpt`` from a run's checkpoint (any layout)."""

from __future__ import annotations

import os
from typing import Any

from ..sampling import ByteCodec, SampleError, Sampler, load_from_checkpoint

__all__ = ["gpt_sampler"]


def gpt_sampler(source: str, comm: Any) -> Sampler:
    """The GPT of ``source`` (a run's ``--out``, its ``checkpoints/`` or one step directory) over the
    tensor communicator ``comm``.

    Raises:
        SampleError: no such run, no checkpoint, or a checkpoint of another model.
    """
    from ...training.checkpoint import load_file, newest_checkpoint
    from ...training.state import COMMON
    from .model import GPTConfig, check_tensor, gpt_model, unit_names

    if not os.path.exists(source):
        raise SampleError(f"{source}: no such run directory")
    path = newest_checkpoint(source)
    if path is None:
        raise SampleError(f"{source} has no complete checkpoint to sample from; let the run finish (it "
                          "writes one at the end) or train with --checkpoint-every N")
    extra = load_file(path, COMMON).get("extra") or {}
    if "gpt_config" not in extra:
        raise SampleError(f"{path} is not a checkpoint of hvdtrain gpt")
    cfg = GPTConfig(**extra["gpt_config"])
    check_tensor(cfg, comm.Get_size())
    module = gpt_model(cfg, 0, [len(unit_names(cfg.layers))], comm).build(0)
    return Sampler(load_from_checkpoint(module, path), comm, ByteCodec(), cfg.context, cfg.vocab)
