"""A Hugging Face GPT-2 directory (``--model DIR``): checked once, then read a stage and a shard at a time.

A directory is what ``save_pretrained`` writes for a ``GPT2LMHeadModel`` and its
tokenizer: ``config.json`` (``model_type`` gpt2), the weights
(``model.safetensors``, a sharded safetensors index, or ``pytorch_model.bin``)
and the tokenizer's files. :meth:`ModelDir.open` checks all of it (one line
naming the fix); :class:`WeightReader` then gives each rank only the tensors of
its stages, and of a sharded tensor only its slice: safetensors slices are read
from the file without loading the rest (a ``.bin`` is memory-mapped).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ...errors import InputError
from ...parallel.ownership import Sharded

__all__ = ["ModelDir", "ModelDirError", "TOKENIZER_FILES", "WeightReader", "shard_ranges"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


class ModelDirError(InputError):
    """A ``--model`` directory that cannot be trained as GPT-2."""


@dataclass
class ModelDir:
    """A checked GPT-2 directory: its config, tokenizer (and the tokenizer's files, to travel) and weights."""

    path: str
    config: Any
    tokenizer: Any
    tokenizer_files: dict[str, bytes]

    @classmethod
    def open(cls, path: str, what: str = "--model") -> "ModelDir":
        """Raises: ModelDirError (a missing directory, config, tokenizer or weights; another model type;
        a tokenizer with more tokens than the embedding has rows)."""
        from transformers import AutoTokenizer, GPT2Config

        if not os.path.isdir(path):
            raise ModelDirError(f"{what} {path}: no such directory; pass a directory written by "
                                "save_pretrained (config.json, weights, tokenizer files)")
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise ModelDirError(f"{what} {path} has no config.json: it is not a Hugging Face model directory")
        kind = json.load(open(cfg_file)).get("model_type")
        if kind != "gpt2":
            raise ModelDirError(f"{what} {path} holds a {kind!r} model; hvdtrain gpt2 trains GPT-2 "
                                "(config.json model_type \"gpt2\")")
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
            raise ModelDirError(f"{what} {path} has no tokenizer (tokenizer.json, or vocab.json and "
                                "merges.txt); save one beside the weights with "
                                "tokenizer.save_pretrained(DIR)")
        _weights(path, what)
        config = GPT2Config.from_pretrained(path)
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # tokenizers fail in many types
            raise ModelDirError(f"{what} {path}: its tokenizer does not load ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:160]})") from None
        if len(tok) > config.vocab_size:
            raise ModelDirError(f"{what} {path}: the tokenizer has {len(tok)} tokens but the embedding "
                                f"{config.vocab_size} rows; give the tokenizer the model was trained with")
        if tok.eos_token_id is None:
            raise ModelDirError(f"{what} {path}: the tokenizer has no end-of-text token (documents are "
                                "joined by it); set eos_token and save the tokenizer again")
        files = {f: open(os.path.join(path, f), "rb").read() for f in TOKENIZER_FILES
                 if os.path.isfile(os.path.join(path, f))}
        return cls(path, config, tok, files)

    def reader(self) -> "WeightReader":
        return WeightReader(self.path)


def _weights(path: str, what: str) -> tuple[str, list[str]]:
    """(kind, files): ``safetensors`` files (one, or an index's shards) or one ``bin``."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set(json.load(open(index))["weight_map"].values()))
        return "safetensors", [os.path.join(path, s) for s in shards]
    for kind, name in (("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")):
        if os.path.isfile(os.path.join(path, name)):
            return kind, [os.path.join(path, name)]
    raise ModelDirError(f"{what} {path} has no weights (model.safetensors or pytorch_model.bin); save the "
                        "model with model.save_pretrained(DIR)")


def shard_ranges(length: int, shard: Optional[Sharded]) -> list[tuple[int, int]]:
    """The ``[lo, hi)`` ranges of dimension ``shard.dim`` (of ``length`` rows, unpadded) that ``shard``
    holds, in order; rows past ``length`` are padding (see :class:`Sharded`)."""
    if shard is None:
        return [(0, length)]
    block = (length + shard.pad) // shard.parts
    n = block // shard.size
    return [(b * block + n * shard.index, b * block + n * (shard.index + 1)) for b in range(shard.parts)]


class WeightReader:
    """Tensors of a GPT-2 directory by our full names (``transformer.h.0.attn.c_attn.weight``), a slice
    at a time. Hub checkpoints saved from ``GPT2Model`` lack the ``transformer.`` prefix, and a tied
    ``lm_head.weight`` is the token embedding: both are found."""

    def __init__(self, path: str) -> None:
        self.kind, files = _weights(path, "--model")
        self._where: dict[str, str] = {}
        self._open: dict[str, Any] = {}
        if self.kind == "safetensors":
            from safetensors import safe_open

            for f in files:
                h = safe_open(f, "pt")
                self._open[f] = h
                self._where.update((k, f) for k in h.keys())
        else:
            sd = torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)
            self._open[files[0]] = sd
            self._where.update((k, files[0]) for k in sd)

    def key(self, name: str) -> str:
        bare = name.removeprefix("transformer.")
        tied = ("transformer.wte.weight", "wte.weight") if name == "lm_head.weight" else ()
        for k in (name, bare, *tied):
            if k in self._where:
                return str(k)
        raise ModelDirError(f"--model: the weights have no {name!r} (nor {bare!r}); is it a GPT2LMHeadModel "
                            "of this config?")

    def read(self, name: str, shard: Optional[Sharded]) -> torch.Tensor:
        """``name``'s tensor, or of a sharded one only this shard's rows (padding rows as zeros)."""
        k = self.key(name)
        src = self._open[self._where[k]]
        if self.kind == "safetensors":
            sl = src.get_slice(k)
            shape = list(sl.get_shape())
        else:
            sl = src[k]
            shape = list(sl.shape)
        if shard is None:
            whole: torch.Tensor = sl[:].clone() if self.kind == "bin" else sl[:]
            return whole
        pieces = []
        for lo, hi in shard_ranges(shape[shard.dim], shard):
            real = min(hi, shape[shard.dim])
            index = [slice(None)] * len(shape)
            index[shard.dim] = slice(lo, real)
            got = sl[tuple(index)] if real > lo else None
            part = [got] if got is not None else []
            if hi > real:  # padding rows
                pad_shape = list(shape)
                pad_shape[shard.dim] = hi - max(lo, real)
                part.append(torch.zeros(pad_shape, dtype=_dtype(sl, self.kind)))
            pieces += part
        return torch.cat([p.clone() for p in pieces], shard.dim)


def _dtype(sl: Any, kind: str) -> torch.dtype:
    if kind == "bin":
        return sl.dtype  # type: ignore[no-any-return]
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    return names.get(sl.get_dtype(), torch.float32)
