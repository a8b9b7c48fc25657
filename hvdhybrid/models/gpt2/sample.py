"""A :class:`~hvdhybrid.models.sampling.Sampler` for GPT-2 from a merged directory or a run's checkpoint."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ..sampling import ByteCodec, SampleError, Sampler, checkpoint_extra, load_from_checkpoint

__all__ = ["TokenizerCodec", "gpt2_sampler", "is_checkpoint_source", "tokenizer_from_files"]


class TokenizerCodec:
    """A Hugging Face tokenizer as ``encode``/``decode`` (no special tokens added)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids))


def tokenizer_from_files(files: dict[str, bytes]) -> Any:
    """The tokenizer whose saved files a checkpoint carries."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="hvdhybrid-tok-") as d:
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        return AutoTokenizer.from_pretrained(d)


def is_checkpoint_source(source: str) -> bool:
    """A run's ``--out``, its ``checkpoints/`` or one step directory (not a model directory)."""
    return any(os.path.exists(os.path.join(source, x)) for x in ("checkpoints", "manifest.json", "latest"))


def gpt2_sampler(source: str, comm: Any) -> Sampler:
    """GPT-2 over the tensor communicator ``comm`` from ``source``: a merged (or any ``from_pretrained``)
    directory, or a run of ``hvdtrain gpt2`` (its newest complete checkpoint, of any layout).

    Raises:
        SampleError: no checkpoint; ModelDirError: a directory that is not GPT-2;
        ConfigError: heads or hidden size not divisible by the ranks.
    """
    from transformers import GPT2Config

    from .model import check_tensor, gpt2_model, unit_names
    from .pretrained import ModelDir

    if not os.path.exists(source):
        raise SampleError(f"{source}: no such run or model directory")
    if not is_checkpoint_source(source):
        md = ModelDir.open(source, "sample:")
        check_tensor(md.config, comm.Get_size())
        model = gpt2_model(md.config, 0, [len(unit_names(md.config.n_layer))], comm, reader=md.reader())
        return Sampler(model.build(0), comm, TokenizerCodec(md.tokenizer), md.config.n_positions,
                       md.config.vocab_size)
    path, extra = checkpoint_extra(source, "hf_config", "gpt2")
    config = GPT2Config.from_dict(extra["hf_config"])
    check_tensor(config, comm.Get_size())
    files = extra.get("tokenizer_files")
    codec = TokenizerCodec(tokenizer_from_files(files)) if files else ByteCodec()
    module = gpt2_model(config, 0, [len(unit_names(config.n_layer))], comm).build(0)
    return Sampler(load_from_checkpoint(module, path), comm, codec, config.n_positions, config.vocab_size)
