"""Merge a parallel gpt2 checkpoint into one directory that ``GPT2LMHeadModel.from_pretrained`` loads."""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["merge_checkpoint"]


def merge_checkpoint(ckpt: str, out: str) -> tuple[str, Any]:
    """Write the newest complete checkpoint under ``ckpt`` to ``out`` as a from_pretrained directory,
    with the tokenizer the run was trained with (a run from ``--model DIR``); any vocabulary padding
    for the tensor size is dropped (the slices are joined without it).

    Returns:
        (the checkpoint directory merged, the merged ``GPT2LMHeadModel``).

    Raises:
        CheckpointError: ``out`` exists, no checkpoint, or one of another model.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ...training.checkpoint import CheckpointError, Manifest, load_file, newest_checkpoint
    from ...training.state import COMMON, CheckpointReader

    if os.path.exists(out):
        raise CheckpointError(f"{out} exists; merge writes a new directory: pass another OUT")
    path = newest_checkpoint(ckpt)
    if path is None:
        raise CheckpointError(f"{ckpt}: no complete checkpoint there; pass a gpt2 run's --out, its "
                              "checkpoints/ or one step-NNNNNN directory")
    manifest = Manifest.read(os.path.join(path, "manifest.json"))
    common = load_file(path, COMMON)
    cfg = (common.get("extra") or {}).get("hf_config")
    if cfg is None or cfg.get("model_type") != "gpt2":
        raise CheckpointError(f"{path} is a checkpoint of model {common.get('model')!r}, "
                              "not of hvdtrain gpt2")
    params = CheckpointReader(path, manifest).parameters()
    model = GPT2LMHeadModel(GPT2Config.from_dict(cfg))
    missing, unexpected = model.load_state_dict(params, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise CheckpointError(f"{path} does not fit a GPT-2 of its own config: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    with torch.no_grad():
        model.tie_weights()
    os.makedirs(out)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(out)
    for name, data in (common["extra"].get("tokenizer_files") or {}).items():  # the tokenizer travels
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    with open(os.path.join(out, "hvdhybrid.json"), "w") as f:
        json.dump({"from": os.path.abspath(path), "step": manifest.step}, f, indent=2)
    return path, model
