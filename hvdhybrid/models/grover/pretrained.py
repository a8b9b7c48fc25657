"""The hand-off from pretraining to finetuning: one file with the encoder, its config and vocabularies.

``hvdtrain grover pretrain`` writes ``OUT/grover.pt`` at the end (whatever
layout it ran on: parameters are stored by full-model name);
``hvdtrain grover finetune --checkpoint OUT`` (or the file) loads the
encoder (both views' blocks and embeddings) and starts new heads.
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields
from typing import Any, Optional

import torch
from torch import nn

from ...training.data import DataError
from .model import GroverConfig

__all__ = ["FORMAT", "FILE", "config_from", "freeze", "load_encoder", "load_pretrained", "save_pretrained"]

FORMAT = "hvdhybrid-grover-pretrain/1"
FILE = "grover.pt"
_ENCODER = ("node_blocks.", "edge_blocks.", "node_emb.", "edge_emb.")


def save_pretrained(path: str, name: str, cfg: GroverConfig, params: dict[str, torch.Tensor],
                    atom_vocab: str, bond_vocab: str, steps: int, molecules: int) -> None:
    """Write atomically (temporary file, then rename): a reader never sees half a file."""
    state = {"format": FORMAT, "name": name, "config": asdict(cfg), "steps": steps, "molecules": molecules,
             "atom_vocab": atom_vocab, "bond_vocab": bond_vocab,
             "params": {k: v for k, v in params.items() if k.startswith(_ENCODER)}}
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_pretrained(path: str) -> dict[str, Any]:
    """Read a pretraining file (or the ``grover.pt`` in a run directory); DataError if it is not one."""
    file = os.path.join(path, FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        where = f"{path} holds no {FILE}" if os.path.isdir(path) else f"{path}: no such file"
        raise DataError(f"--checkpoint: {where}; pass the --out directory of a finished "
                        f"`hvdtrain grover pretrain` run, or its {FILE}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise DataError(f"--checkpoint: {file} cannot be read ({type(e).__name__}); "
                        "pass a grover.pt written by `hvdtrain grover pretrain`") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"--checkpoint: {file} is not a GROVER pretraining file ({FORMAT}); "
                        "pass a grover.pt written by `hvdtrain grover pretrain`")
    return state


def config_from(state: dict[str, Any]) -> GroverConfig:
    names = {f.name for f in fields(GroverConfig)}
    return GroverConfig(**{k: v for k, v in state["config"].items() if k in names})


def check_config(state: dict[str, Any], cfg: GroverConfig, file: str) -> None:
    """The encoder's shape must match (dropout may differ)."""
    have = config_from(state)
    diff = [f"{f.name} {getattr(have, f.name)} (asked: {getattr(cfg, f.name)})" for f in fields(GroverConfig)
            if f.name != "dropout" and getattr(have, f.name) != getattr(cfg, f.name)]
    if diff:
        raise DataError(f"--checkpoint: {file} was pretrained with " + ", ".join(diff)
                        + "; drop --config/--layers to take the checkpoint's")


def load_encoder(net: nn.Module, state: dict[str, Any], file: Optional[str] = None) -> int:
    """Copy the pretrained encoder into ``net`` (a GroverNet); returns how many tensors were loaded."""
    params = state["params"]
    mine = {k for k in net.state_dict() if k.startswith(_ENCODER)}
    if set(params) != mine:
        missing, extra = sorted(mine - set(params))[:3], sorted(set(params) - mine)[:3]
        raise DataError(f"--checkpoint: {file or 'the file'} does not fit this model "
                        f"(missing {missing}, unexpected {extra})")
    net.load_state_dict(params, strict=False)
    return len(params)


def freeze(net: nn.Module) -> int:
    """Stop training ``net``'s encoder (its pretrained part); returns how many parameters that holds."""
    n = 0
    for name, p in net.named_parameters():
        if name.startswith(_ENCODER):
            p.requires_grad_(False)
            n += p.numel()
    return n
