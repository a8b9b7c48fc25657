"""A :class:`~hvdhybrid.models.sampling.Sampler` for ``hvdtrain gpt`` from a run's checkpoint (any layout)."""

from __future__ import annotations

import os
from typing import Any

from ..sampling import ByteCodec, SampleError, Sampler, checkpoint_extra, load_from_checkpoint

__all__ = ["gpt_sampler"]


def gpt_sampler(source: str, comm: Any) -> Sampler:
    """The GPT of ``source`` (a run's ``--out``, its ``checkpoints/`` or one step directory) over the
    tensor communicator ``comm``.

    Raises:
        SampleError: no such run, no checkpoint, or a checkpoint of another model.
    """
    from .model import GPTConfig, check_tensor, gpt_model, unit_names

    if not os.path.exists(source):
        raise SampleError(f"{source}: no such run directory")
    path, extra = checkpoint_extra(source, "gpt_config", "gpt")
    cfg = GPTConfig(**extra["gpt_config"])
    check_tensor(cfg, comm.Get_size())
    module = gpt_model(cfg, 0, [len(unit_names(cfg.layers))], comm).build(0)
    return Sampler(load_from_checkpoint(module, path), comm, ByteCodec(), cfg.context, cfg.vocab)
