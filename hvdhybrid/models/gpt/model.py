"""A GPT-style causal language model that runs on token slices (TeraPipe), tensor-parallel, in stages.

Pre-LN transformer blocks, learned positions, a byte-level vocabulary (256:
nothing to download) and an output layer tied to the token embedding or not.
Units of the chain: ``embed`` (``wte``, ``wpe``, dropout), ``h.0`` ..
``h.L-1``, ``head`` (``ln_f``, and ``lm_head`` when untied). A stage holds
consecutive units; each unit is built under a generator keyed by (seed, unit),
so a rank builds only its own units and they equal the single-process model's.

Token slices: every stage takes ``cache=`` (a :class:`~hvdhybrid.pipeline.kvcache.SliceCache`
or ``None``). The embedding reads positions from ``cache.start``; each
attention layer hands its keys and values to ``cache.extend`` and attends to
those of the earlier slices too, with the causal mask shifted by the slice's
offset. Dropout masks are drawn for the whole sequence (all heads) and cut to
the slice's window, so a sliced run draws what an unsliced one draws.

Tensor parallel over the stage's tensor communicator (Megatron's split, as
:mod:`hvdhybrid.models.gpt2`): ``qkv`` column-parallel by heads (a
block-strided shard, ``parts=3``), ``proj`` and ``fc2`` row-parallel, ``fc``
column-parallel, ``wte``/``lm_head`` split by vocabulary rows; keys and values
are per head, so each tensor rank caches only its own heads.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ...errors import InputError
from ...parallel import recompute
from ...parallel.dropout import keyed_window_drop
from ...parallel.graph import StageGraph
from ...parallel.ownership import Tie
from ...parallel.staged import StagedModel, UnitChain, keyed
from ...parallel.tensor_parallel import (
    copy_to,
    reduce_from,
    shard_parameter,
    vocab_parallel_cross_entropy,
    vocab_parallel_embedding,
)
from ...pipeline.kvcache import SliceCache

__all__ = ["BYTES", "CONFIGS", "GPTConfig", "ConfigError", "GPTStage", "config", "gpt_model", "unit_names",
           "check_tensor"]

BYTES = 256  # byte-level vocabulary


class ConfigError(InputError):
    """An unknown config, a tensor split that does not divide it, or a sequence longer than its positions."""


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT: layers, hidden size, heads, positions (context), vocabulary, tying, dropout."""

    layers: int
    hidden: int
    heads: int
    context: int
    vocab: int = BYTES
    tied: bool = True
    dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameter_count(self, vocab: Optional[int] = None) -> int:
        """Parameters of the whole model (``vocab`` to count with another vocabulary size)."""
        v, h = self.vocab if vocab is None else vocab, self.hidden
        block = 12 * h * h + 13 * h  # ln_1, qkv, proj, ln_2, fc, fc2 (weights and biases)
        return v * h + self.context * h + self.layers * block + 2 * h + (0 if self.tied else v * h)


# GPT-3 shapes from Brown et al. (2020), table 2.1, context 2048. Two rows are adjusted so that
# the heads divide the hidden size: gpt3-xl uses 16 heads of 128 (the table lists 24 heads of 128
# for a hidden size of 2048), gpt3-13b a hidden size of 5120 (40 heads of 128; the table says 5140).
CONFIGS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(2, 64, 4, 256),
    "mini": GPTConfig(4, 128, 4, 1024),
    "small": GPTConfig(6, 256, 8, 2048),
    "gpt3-small": GPTConfig(12, 768, 12, 2048),
    "gpt3-medium": GPTConfig(24, 1024, 16, 2048),
    "gpt3-large": GPTConfig(24, 1536, 16, 2048),
    "gpt3-xl": GPTConfig(24, 2048, 16, 2048),
    "gpt3-2.7b": GPTConfig(32, 2560, 32, 2048),
    "gpt3-6.7b": GPTConfig(32, 4096, 32, 2048),
    "gpt3-13b": GPTConfig(40, 5120, 40, 2048),
    "gpt3-175b": GPTConfig(96, 12288, 96, 2048),
}


def config(name: str, dropout: float = 0.0, tied: bool = True) -> GPTConfig:
    """The named config with the given dropout and tying.

    Raises:
        ConfigError: on an unknown name (listing the choices) or a dropout outside [0, 1).
    """
    if name not in CONFIGS:
        raise ConfigError(f"unknown GPT config {name!r}; choose one of {', '.join(CONFIGS)} "
                          "(hvdtrain gpt configs lists them)")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {dropout}")
    c = CONFIGS[name]
    return GPTConfig(c.layers, c.hidden, c.heads, c.context, c.vocab, tied, dropout)


def check_tensor(cfg: GPTConfig, tensor: int) -> None:
    """The tensor size must divide the heads, the hidden size and the vocabulary."""
    if tensor < 1:
        raise ConfigError(f"--tensor must be >= 1, got {tensor}")
    for what, n in (("attention heads", cfg.heads), ("hidden size", cfg.hidden), ("vocabulary", cfg.vocab)):
        if n % tensor:
            ok = [t for t in range(1, 9) if cfg.heads % t == 0 and cfg.hidden % t == 0 and cfg.vocab % t == 0]
            raise ConfigError(f"--tensor {tensor} does not divide the {what} ({n}); use --tensor "
                              f"{' or '.join(map(str, ok))}")


def unit_names(layers: int) -> list[str]:
    return ["embed"] + [f"h.{i}" for i in range(layers)] + ["head"]


def _key(unit: str) -> int:
    return zlib.crc32(unit.encode())


def _linear(n_in: int, n_out: int) -> nn.Linear:
    m = nn.Linear(n_in, n_out)
    nn.init.normal_(m.weight, std=0.02)
    nn.init.zeros_(m.bias)
    return m


def _embedding(n: int, h: int) -> nn.Embedding:
    m = nn.Embedding(n, h)
    nn.init.normal_(m.weight, std=0.02)
    return m


class Block(nn.Module):
    """One pre-LN transformer block, its matrices split over ``comm``."""

    def __init__(self, cfg: GPTConfig, comm: Any) -> None:
        super().__init__()
        h = cfg.hidden
        self.ln_1, self.ln_2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = _linear(h, 3 * h), _linear(h, h)
        self.fc, self.fc2 = _linear(h, 4 * h), _linear(4 * h, h)
        nn.init.normal_(self.proj.weight, std=0.02 / math.sqrt(2 * cfg.layers))  # GPT-2's scaled init
        nn.init.normal_(self.fc2.weight, std=0.02 / math.sqrt(2 * cfg.layers))
        self.qkv.weight = shard_parameter(self.qkv.weight, comm, 0, parts=3)
        self.qkv.bias = shard_parameter(self.qkv.bias, comm, 0, parts=3)
        self.proj.weight = shard_parameter(self.proj.weight, comm, 1)
        self.fc.weight = shard_parameter(self.fc.weight, comm, 0)
        self.fc.bias = shard_parameter(self.fc.bias, comm, 0)
        self.fc2.weight = shard_parameter(self.fc2.weight, comm, 1)


class GPTStage(UnitChain):
    """Consecutive units of a GPT (``embed``, ``h.i``, ``head``), split over the tensor communicator."""

    def __init__(self, cfg: GPTConfig, units: Sequence[str], comm: Any, seed: int) -> None:
        super().__init__()
        self.cfg, self.units, self.comm = cfg, list(units), comm
        tp, rank = comm.Get_size(), comm.Get_rank()
        self.local_heads, self.first_head = cfg.heads // tp, rank * (cfg.heads // tp)
        self.vocab_start = (cfg.vocab // tp) * rank
        self.h = nn.ModuleDict()
        for u in self.units:
            if u == "embed":
                wte, wpe = keyed(seed, _key(u), lambda: (_embedding(cfg.vocab, cfg.hidden),
                                                         _embedding(cfg.context, cfg.hidden)))
                wte.weight = shard_parameter(wte.weight, comm, 0)
                self.wte, self.wpe = wte, wpe
            elif u == "head":
                self.ln_f = nn.LayerNorm(cfg.hidden)
                if cfg.tied and "embed" in self.units:
                    self.lm_head = self.wte  # one parameter within the stage
                else:
                    key = "embed" if cfg.tied else u  # tied across stages: the embedding's initial value
                    w = keyed(seed, _key(key), lambda: _embedding(cfg.vocab, cfg.hidden))
                    w.weight = shard_parameter(w.weight, comm, 0)
                    self.lm_head = w
            else:
                self.h[u.split(".")[1]] = keyed(seed, _key(u), lambda: Block(cfg, comm))

    def forward(self, x: torch.Tensor, cache: Optional[SliceCache] = None) -> torch.Tensor:
        """The units in order, with the token slices' cache (``pieces()``, for ``--recompute full``,
        which token slices refuse, run them without)."""
        for u in self.units:
            x = self._unit(u, x, cache)
        return x

    def _unit(self, u: str, x: torch.Tensor, cache: Optional[SliceCache] = None) -> torch.Tensor:
        start = cache.start if cache is not None else 0
        total = cache.total if cache is not None else x.shape[1]
        if u == "embed":
            tok = vocab_parallel_embedding(x, self.wte.weight, self.vocab_start, self.comm)
            pos = self.wpe(torch.arange(start, start + x.shape[1], device=x.device))
            return self._drop(tok + pos, "embed.drop", start, total)
        if u == "head":
            return copy_to(self.ln_f(x), self.comm) @ self.lm_head.weight.t()
        return self._block(u, self.h[u.split(".")[1]], x, cache, start, total)

    def _drop(self, x: torch.Tensor, name: str, start: int, total: int) -> torch.Tensor:
        """Residual/embedding dropout: the mask of the whole sequence, cut to these tokens."""
        p = self.cfg.dropout
        if not self.training or p == 0.0:
            return x
        return keyed_window_drop(x, p, name, (total, x.shape[2]), (slice(start, start + x.shape[1]),))

    def _block(self, name: str, blk: Any, x: torch.Tensor, cache: Optional[SliceCache], start: int,
               total: int) -> torch.Tensor:
        b, n, _ = x.shape
        hd, hl = self.cfg.head_dim, self.local_heads
        qkv = nn.functional.linear(copy_to(blk.ln_1(x), self.comm), blk.qkv.weight, blk.qkv.bias)
        q, k, v = (t.reshape(b, n, hl, hd).transpose(1, 2) for t in qkv.chunk(3, -1))
        if cache is not None:
            k, v = cache.extend(name, k, v)
        ctx = k.shape[2]  # start + n: this slice's tokens attend to every earlier one

        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd)
            causal = (torch.arange(ctx, device=q.device)[None, :]  # q's, not x's: a closure over x would
                      <= torch.arange(start, start + n, device=q.device)[:, None])  # keep the graph alive
            probs = torch.softmax(scores.masked_fill(~causal, torch.finfo(scores.dtype).min), dim=-1)
            if self.training and self.cfg.dropout > 0:
                probs = keyed_window_drop(
                    probs, self.cfg.dropout, f"{name}.attn.drop", (self.cfg.heads, total, total),
                    (slice(self.first_head, self.first_head + hl), slice(start, start + n), slice(0, ctx)))
            return torch.matmul(probs, v)
        att = recompute.attention(core, q, k, v).transpose(1, 2).reshape(b, n, hl * hd)
        out = reduce_from(nn.functional.linear(att, blk.proj.weight), self.comm) + blk.proj.bias
        x = x + self._drop(out, f"{name}.attn.resid", start, total)
        hmid = nn.functional.gelu(nn.functional.linear(copy_to(blk.ln_2(x), self.comm), blk.fc.weight,
                                                       blk.fc.bias), approximate="tanh")
        y = reduce_from(nn.functional.linear(hmid, blk.fc2.weight), self.comm) + blk.fc2.bias
        return x + self._drop(y, f"{name}.mlp.resid", start, total)


def gpt_model(cfg: GPTConfig, seed: int, sizes: Sequence[int], tensor: Any) -> StagedModel:
    """A chain of ``len(sizes)`` stages holding ``sizes[s]`` consecutive units each.

    Each rank builds only its stages (keyed by unit), split over ``tensor``, the
    tensor communicator of the caller's groups (``MPI.COMM_SELF``: whole tensors). The output layer, when
    tied and on another stage than the embedding, is one parameter across stages.

    Raises:
        ConfigError: if ``sizes`` does not cover the units.
    """
    units = unit_names(cfg.layers)
    if sum(sizes) != len(units) or any(s < 1 for s in sizes):
        raise ConfigError(f"stage sizes {list(sizes)} do not cover the {len(units)} units "
                          "(embed, blocks, head)")
    firsts = [sum(sizes[:s]) for s in range(len(sizes))]
    last = len(sizes) - 1

    def build(stage: int) -> nn.Module:
        return GPTStage(cfg, units[firsts[stage]:firsts[stage] + sizes[stage]], tensor, seed)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        start = (cfg.vocab // tensor.Get_size()) * tensor.Get_rank()
        return vocab_parallel_cross_entropy(logits, target, start, tensor)

    ties = (Tie({0: "wte.weight", last: "lm_head.weight"}),) if cfg.tied and last > 0 else ()
    return StagedModel(StageGraph.chain(len(sizes)), None, loss, builder=build, ties=ties, attention=True,
                       checkpoint_extra={"gpt_config": cfg.__dict__.copy()})
