"""Text from a trained language model: greedy or top-k sampling with a seed, on one rank or tensor-parallel.

The model is one stage holding every unit (embeddings, blocks, head), split over
a tensor communicator (``MPI.COMM_SELF`` on one rank). Each new token runs the
whole window through it; the vocabulary slices of the last position's logits
are gathered on every rank, so every rank draws the same token from the same
seeded generator and the ranks never disagree. Parameters come from a run's
checkpoint (any layout: slices are joined, then cut for this communicator) or,
for GPT-2, from a merged directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import InputError
from ..parallel.ownership import cut, owner_of, shard_of

__all__ = ["ByteCodec", "SampleError", "Sampler", "checkpoint_extra", "generate", "load_from_checkpoint"]


class SampleError(InputError):
    """Nothing to sample from (no checkpoint, an empty prompt, bad sampling options)."""


class ByteCodec:
    """The byte-level 'tokenizer' of runs without one: ids are UTF-8 bytes."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def generate(next_logits: Callable[[torch.Tensor], torch.Tensor], prompt: list[int], tokens: int,
             context: int, top_k: int = 0, seed: int = 0) -> list[int]:
    """``tokens`` new ids after ``prompt``: argmax (``top_k`` 0) or a draw from the ``top_k`` most
    likely, under a generator seeded by ``seed``. ``next_logits(ids (1, L))`` gives the last position's
    logits over the whole vocabulary; the window is the last ``context`` ids."""
    g = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    for _ in range(tokens):
        logits = next_logits(torch.tensor([ids[-context:]], dtype=torch.long)).float()
        if top_k > 0:
            vals, idx = logits.topk(min(top_k, logits.numel()))
            pick = int(idx[torch.multinomial(torch.softmax(vals, -1), 1, generator=g)])
        else:
            pick = int(logits.argmax())
        ids.append(pick)
    return ids[len(prompt):]


@dataclass
class Sampler:
    """A one-stage model over ``comm`` and how to turn text into its ids and back."""

    module: nn.Module
    comm: Any
    codec: Any  # .encode(text) -> ids, .decode(ids) -> text
    context: int
    vocab: int  # the real vocabulary (padding columns are dropped)

    def next_logits(self, ids: torch.Tensor) -> torch.Tensor:
        from ..parallel.tensor_parallel import gather_last

        with torch.no_grad():
            local = self.module(ids)[0, -1]
        return gather_last(local, self.comm)[: self.vocab]

    def __call__(self, prompt: str, tokens: int, top_k: int = 0, seed: int = 0) -> str:
        ids = self.codec.encode(prompt)
        if not ids:
            raise SampleError("--prompt is empty; give some text to continue")
        if tokens < 1 or top_k < 0:
            raise SampleError(f"--tokens must be >= 1 and --top-k >= 0 (got {tokens}, {top_k})")
        self.module.eval()
        return str(self.codec.decode(generate(self.next_logits, ids, tokens, self.context, top_k, seed)))


def checkpoint_extra(source: str, key: str, command: str) -> tuple[str, dict[str, Any]]:
    """The newest complete checkpoint of the run ``source`` and its model facts (``checkpoint_extra``),
    which must hold ``key`` (the model's config, written by ``hvdtrain COMMAND``).

    Raises:
        SampleError: no checkpoint, or one of another model.
    """
    from ..training.checkpoint import load_file, newest_checkpoint
    from ..training.state import COMMON

    path = newest_checkpoint(source)
    if path is None:
        raise SampleError(f"{source} has no complete checkpoint to sample from; let the run finish (it "
                          "writes one at the end) or train with --checkpoint-every N")
    extra: dict[str, Any] = load_file(path, COMMON).get("extra") or {}
    if key not in extra:
        raise SampleError(f"{path} is not a checkpoint of hvdtrain {command}")
    return path, extra


def load_from_checkpoint(module: nn.Module, path: str) -> nn.Module:
    """Fill ``module``'s parameters (full names, maybe sharded) from the checkpoint directory ``path``
    of any layout: each name's slices joined, then cut for this module's shard."""
    from ..training.checkpoint import Manifest
    from ..training.state import CheckpointReader

    reader = CheckpointReader(path, Manifest.read(f"{path}/manifest.json"))
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
        params[id(p)] = p
    with torch.no_grad():
        for key, p in params.items():
            src: Optional[str] = next((n for n in names[key] if n in reader.manifest.names), None)
            if src is None:
                raise SampleError(f"the checkpoint {path} has no {names[key][0]!r}: it is of another model")
            got = cut(reader.whole(src, "params"), shard_of(owner_of(p)))
            if got.shape != p.shape:
                raise SampleError(f"the checkpoint's {src} has shape {tuple(got.shape)}, the model "
                                  f"{tuple(p.shape)}")
            p.copy_(got)
    return module
