"""A stock Hugging Face ``GPT2LMHeadModel``, converted in place to tensor parallel and cut into stages.

Units of the chain: ``embeddings`` (wte, wpe, dropout), ``h.0`` .. ``h.L-1``,
``head`` (ln_f, lm_head). A stage holds consecutive units, mounted under
their Hugging Face names (``transformer.h.3.attn.c_attn.weight``), so the
parameters of any layout merge back into one ``from_pretrained`` directory.

Over the tensor ranks of a stage (Megatron's split, :mod:`hvdhybrid.parallel.tensor_parallel`):
``c_attn`` (the fused Q | K | V projection) is column-parallel by heads, a
block-strided shard (``Sharded(parts=3)``: each rank holds its heads' Q, K and
V columns); ``attn.c_proj`` and ``mlp.c_proj`` are row-parallel; ``mlp.c_fc``
is column-parallel; the token embedding is split by vocabulary rows and the
output layer (tied to it: one parameter, across stages too) gives each rank
its vocabulary columns of the logits, which the vocabulary-parallel cross
entropy consumes without ever joining them.

The forward is written here with Hugging Face's weights, so that every
dropout is keyed by data row (and, for attention, drawn for all heads then
split), matching one process at any layout. With dropout off it computes
what the unmodified model computes (the transparency tests compare with it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ...errors import InputError
from ...parallel import recompute
from ...parallel.dropout import KeyedDropout, keyed_head_drop
from ...parallel.graph import StageGraph
from ...parallel.ownership import Sharded, Tie, owner_of, shard_of, tag
from ...parallel.staged import StagedModel, UnitChain, mount
from ...parallel.tensor_parallel import (
    copy_to,
    reduce_from,
    shard_parameter,
    vocab_parallel_cross_entropy,
    vocab_parallel_embedding,
)

__all__ = ["CONFIGS", "GPT2Size", "ConfigError", "hf_config", "hf_model", "gpt2_model", "unit_names",
           "check_tensor", "parallelize", "vocab_padding", "materialize"]

BYTES = 256  # byte-level vocabulary: no tokenizer files to download


class ConfigError(InputError):
    """A model size or tensor split that does not fit."""


@dataclass(frozen=True)
class GPT2Size:
    layers: int
    hidden: int
    heads: int
    context: int


CONFIGS: dict[str, GPT2Size] = {
    "tiny": GPT2Size(2, 64, 4, 64),
    "mini": GPT2Size(4, 256, 8, 256),
    "gpt2-small": GPT2Size(12, 768, 12, 1024),
    "gpt2-medium": GPT2Size(24, 1024, 16, 1024),
}


def hf_config(size: str, dropout: float = 0.1, vocab: int = BYTES) -> Any:
    """The ``GPT2Config`` of a named size (GPT-2's own dropout 0.1 unless given)."""
    from transformers import GPT2Config

    if size not in CONFIGS:
        raise ConfigError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(CONFIGS)}")
    c = CONFIGS[size]
    return GPT2Config(vocab_size=vocab, n_positions=c.context, n_embd=c.hidden, n_layer=c.layers,
                      n_head=c.heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)


def hf_model(config: Any, seed: int) -> Any:
    """The unmodified ``GPT2LMHeadModel`` from ``config``, initialised under ``seed``."""
    from transformers import GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def check_tensor(config: Any, tensor: int) -> None:
    """The tensor size must divide the heads and the hidden size (the vocabulary is padded to fit)."""
    for what, n in (("attention heads", config.n_head), ("hidden size", config.n_embd),
                    ("MLP width", 4 * config.n_embd)):
        if n % tensor:
            ok = [t for t in range(1, 9) if config.n_head % t == 0 and config.n_embd % t == 0]
            raise ConfigError(f"--tensor {tensor} does not divide the {what} ({n}); use --tensor "
                              f"{' or '.join(map(str, ok))}")


def unit_names(layers: int) -> list[str]:
    return ["embeddings"] + [f"h.{i}" for i in range(layers)] + ["head"]


class GPT2Stage(UnitChain):
    """Consecutive units of a GPT-2, its matrices split over the tensor communicator ``comm``."""

    def __init__(self, full: Any, units: Sequence[str], comm: Any) -> None:
        super().__init__()
        cfg = full.config
        self.units, self.comm = list(units), comm
        self.tp, self.rank = comm.Get_size(), comm.Get_rank()
        self.heads = cfg.n_head
        self.local_heads = cfg.n_head // self.tp
        self.vocab, self.pad = cfg.vocab_size, vocab_padding(cfg.vocab_size, self.tp)
        self.vocab_start = ((cfg.vocab_size + self.pad) // self.tp) * self.rank
        self.p = cfg.attn_pdrop
        t = full.transformer
        wte: Optional[nn.Parameter] = None
        for u in self.units:
            if u == "embeddings":
                emb = t.wte
                emb.weight = wte = shard_parameter(emb.weight, comm, 0, pad=self.pad)
                mount(self, "transformer.wte", emb)
                mount(self, "transformer.wpe", t.wpe)
                mount(self, "transformer.drop", KeyedDropout(cfg.embd_pdrop, "transformer.drop"))
            elif u == "head":
                mount(self, "transformer.ln_f", t.ln_f)
                head = full.lm_head
                head.weight = wte if wte is not None else shard_parameter(t.wte.weight, comm, 0, pad=self.pad)
                mount(self, "lm_head", head)
            else:
                i = int(u.split(".")[1])
                block = t.h[i]
                a, m = block.attn, block.mlp
                a.c_attn.weight = shard_parameter(a.c_attn.weight, comm, 1, parts=3)
                a.c_attn.bias = shard_parameter(a.c_attn.bias, comm, 0, parts=3)
                a.c_proj.weight = shard_parameter(a.c_proj.weight, comm, 0)
                m.c_fc.weight = shard_parameter(m.c_fc.weight, comm, 1)
                m.c_fc.bias = shard_parameter(m.c_fc.bias, comm, 0)
                m.c_proj.weight = shard_parameter(m.c_proj.weight, comm, 0)
                a.resid_dropout = KeyedDropout(cfg.resid_pdrop, f"transformer.h.{i}.attn.resid_dropout")
                m.dropout = KeyedDropout(cfg.resid_pdrop, f"transformer.h.{i}.mlp.dropout")
                mount(self, f"transformer.h.{i}", block)

    def _unit(self, u: str, x: Any) -> Any:
        if u == "embeddings":
            wte: Any = self.get_submodule("transformer.wte")
            wpe = self.get_submodule("transformer.wpe")
            tok = vocab_parallel_embedding(x, wte.weight, self.vocab_start, self.comm)
            pos = wpe(torch.arange(x.shape[1], device=x.device))
            x = self.get_submodule("transformer.drop")(tok + pos)
        elif u == "head":
            h = self.get_submodule("transformer.ln_f")(x)
            head: Any = self.get_submodule("lm_head")
            x = copy_to(h, self.comm) @ head.weight.t()
            if self.pad:  # padding rows of the vocabulary: never predicted, never in the loss
                cols = self.vocab_start + torch.arange(x.shape[-1], device=x.device)
                x = x.masked_fill(cols >= self.vocab, float("-inf"))
        else:
            x = self._block(u, self.get_submodule(f"transformer.{u}"), x)
        return x

    def _block(self, name: str, block: Any, x: torch.Tensor) -> torch.Tensor:
        a, m = block.attn, block.mlp
        b, n, _ = x.shape
        hd = a.head_dim
        qkv = torch.addmm(a.c_attn.bias, copy_to(block.ln_1(x), self.comm).reshape(b * n, -1),
                          a.c_attn.weight).view(b, n, -1)
        q, k, v = (t.view(b, n, self.local_heads, hd).transpose(1, 2) for t in qkv.chunk(3, -1))

        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd)
            # q's device, not x's: recomputation keeps this function with the graph, and a closure over
            # x (reassigned below to the block's output) made a cycle through the graph that a kept graph
            # (split W) never freed: every zb1 step leaked its activations under --recompute selective
            causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1)
            if self.training and self.p > 0:
                probs = keyed_head_drop(probs, self.p, f"transformer.{name}.attn.attn_dropout", self.heads,
                                        self.rank * self.local_heads)
            return torch.matmul(probs, v)
        ctx = recompute.attention(core, q, k, v).transpose(1, 2).reshape(b, n, -1)
        out = reduce_from(ctx @ a.c_proj.weight, self.comm) + a.c_proj.bias
        x = x + a.resid_dropout(out)
        hmid = m.act(torch.addmm(m.c_fc.bias, copy_to(block.ln_2(x), self.comm).reshape(b * n, -1),
                                 m.c_fc.weight)).view(b, n, -1)
        y = reduce_from(hmid @ m.c_proj.weight, self.comm) + m.c_proj.bias
        out2: torch.Tensor = x + m.dropout(y)
        return out2


def vocab_padding(vocab: int, tensor: int) -> int:
    """Rows added to the vocabulary so that it divides by the tensor size (Megatron pads it too)."""
    return (-vocab) % tensor


def materialize(module: nn.Module, read: Callable[[str, Optional[Sharded]], torch.Tensor]) -> nn.Module:
    """Replace every parameter of ``module`` (built on the meta device, named by full names) with
    ``read(full name, its shard)`` as float32, keeping its ownership tag and any sharing."""
    made: dict[int, nn.Parameter] = {}
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        if id(p) not in made:
            owner = owner_of(p)
            made[id(p)] = q = nn.Parameter(read(name, shard_of(owner)).float(), requires_grad=p.requires_grad)
            tag(q, owner)
            if tuple(q.shape) != tuple(p.shape):
                raise ConfigError(f"{name} has shape {tuple(q.shape)} in the weights, {tuple(p.shape)} in "
                                  "the model of their config.json: the directory is inconsistent")
        owner_path, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner_path), leaf, made[id(p)])
    return module


def gpt2_model(config: Any, seed: int, sizes: Sequence[int], tensor: Any, source: Optional[Any] = None,
               reader: Optional[Any] = None, checkpoint_extra: Optional[dict[str, Any]] = None
               ) -> StagedModel:
    """A chain of ``len(sizes)`` stages with ``sizes[s]`` units each (embeddings, blocks, head).

    Every rank builds the stock model from ``config`` under ``seed`` (build-then-drop), or takes
    ``source`` (a model the user built: converted in place), or, with ``reader`` (a
    :class:`~hvdhybrid.models.gpt2.pretrained.WeightReader`), builds the model on the meta device
    and reads only its stages' tensors, and of each shard only its slice. Stages are split over
    ``tensor``, the tensor communicator of the caller's groups (``groups.tensor``;
    ``MPI.COMM_SELF`` for whole tensors); the vocabulary is padded to divide by its size.
    """
    units = unit_names(config.n_layer)
    if sum(sizes) != len(units) or any(s < 1 for s in sizes):
        raise ConfigError(f"stage sizes {list(sizes)} do not cover the {len(units)} units")
    firsts = [sum(sizes[:s]) for s in range(len(sizes))]
    last = len(sizes) - 1
    per = (config.vocab_size + vocab_padding(config.vocab_size, tensor.Get_size())) // tensor.Get_size()

    def build(stage: int) -> nn.Module:
        mine = units[firsts[stage]:firsts[stage] + sizes[stage]]
        if reader is not None:
            with torch.device("meta"):
                skeleton = hf_model(config, seed)
            return materialize(GPT2Stage(skeleton, mine, tensor), reader.read)
        full = source if source is not None else hf_model(config, seed)
        return GPT2Stage(full, mine, tensor)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, target, per * tensor.Get_rank(), tensor)

    ties = (Tie({0: "transformer.wte.weight", last: "lm_head.weight"}),) if last > 0 else ()
    return StagedModel(StageGraph.chain(len(sizes)), None, loss, builder=build, ties=ties, attention=True,
                       checkpoint_extra={"hf_config": config.to_dict(), **(checkpoint_extra or {})})


def parallelize(model: Any, groups: Any, stages_per_rank: int = 1) -> StagedModel:
    """A stock ``GPT2LMHeadModel``, converted in place for the launch's groups: its blocks cut
    evenly into the layout's pipeline stages (``stages_per_rank`` per stage group: train it with
    ``TrainConfig(stages_per_rank=...)``), every stage split over the tensor ranks.

    Train it with :class:`~hvdhybrid.training.trainer.Trainer`; its checkpoints merge with
    :func:`hvdhybrid.models.gpt2.merge.merge_checkpoint`.
    """
    check_tensor(model.config, groups.tensor_size)
    units = len(unit_names(model.config.n_layer))
    k = groups.pipeline_size * stages_per_rank
    if k > units:
        raise ConfigError(f"{k} pipeline stages for {units} units (embeddings, blocks, head)")
    sizes = [units // k + (1 if s < units % k else 0) for s in range(k)]
    return gpt2_model(model.config, 0, sizes, groups.tensor, source=model)
