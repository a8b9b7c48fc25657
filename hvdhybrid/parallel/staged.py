"""A model cut into stages: the stage graph, how to build each stage, full-model names, ties.

A rank builds only the stages it runs (:meth:`StagedModel.build`), after its
groups exist. Two ways to give the same initial parameters as one process:

- *keyed build* (:func:`sequential_model`): layer ``i`` is built under a
  generator seeded by ``(seed, i)``, so building layers 4..7 alone gives
  exactly the layers 4..7 of the whole model; a rank never holds the rest.
- *build-then-drop* (``StagedModel(graph, stages, ...)`` with every stage
  module given): every rank builds the whole model from one seed and keeps
  its stages (GROVER; its peak memory is the whole model's).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
from torch import nn

from .graph import StageGraph
from .ownership import Sharded, Tie, Tied, owner_of, shard_of, tag
from .partition import STRATEGIES, PartitionError

__all__ = ["StagedModel", "Part", "Unit", "UnitChain", "LayerFn", "partition_sizes", "split_sequential",
           "sequential_model", "keyed", "keyed_layers", "meta_layers", "mount"]

LayerFn = Callable[[], nn.Module]
T = TypeVar("T")


class Unit(nn.Module):
    """A layer whose children are the full model's top-level modules (torchvision's ``conv1``, ``bn1``,
    ``layer1``, ``fc``): :class:`Part` registers its children under their own names instead of the
    layer under its index, so a chain of units carries a named model's parameter names."""


class Part(nn.Module):
    """Layers ``first .. first+len-1`` of a sequential model, applied in order.

    Parameters keep their full-model names: layer ``i`` is registered as ``str(i)``,
    exactly as in ``nn.Sequential(*all_layers)``; a :class:`Unit`'s children under their own names.
    """

    def __init__(self, layers: Sequence[nn.Module], first: int) -> None:
        super().__init__()
        self.first = first
        self._order = list(layers)  # a plain list: a reused module runs each time it appears
        for i, layer in enumerate(layers):
            if not isinstance(layer, Unit):
                self.add_module(str(first + i), layer)
                continue
            for name, child in layer.named_children():
                if name in self._modules and self._modules[name] is not child:
                    raise ValueError(f"two units of one stage both name a module {name!r}")
                self.add_module(name, child)

    def forward(self, x: Any) -> Any:
        for layer in self._order:
            x = layer(x)
        return x

    def pieces(self) -> list[Callable[[Any], Any]]:
        """The layers in order (``--recompute full`` recomputes them one at a time)."""
        return list(self._order)


class UnitChain(nn.Module):
    """A stage made of named units (``self.units``) applied in order by ``_unit(u, x)``: ``forward`` runs
    them; ``pieces()`` hands them one by one to ``--recompute full``, which recomputes a unit at a time."""

    units: list[str]

    def forward(self, x: Any) -> Any:
        for u in self.units:
            x = self._unit(u, x)
        return x

    def pieces(self) -> list[Callable[[Any], Any]]:
        """Each unit as ``x -> x``, in order."""
        return [functools.partial(self._unit, u) for u in self.units]

    def _unit(self, u: str, x: Any) -> Any:
        raise NotImplementedError


@dataclass
class StagedModel:
    """What a model hands the runtime: graph, how to get each stage's module, the loss, ties.

    Give either ``stages`` (every stage module, built on every rank:
    build-then-drop) or ``builder`` (``stage -> module``, building that stage
    alone with the parameters one process would have).
    """

    graph: StageGraph
    stages: Optional[list[nn.Module]]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    #: name prefix of each stage's parameters in the full model ("" when the
    #: stage modules already use full names, as :class:`Part` does)
    prefixes: Optional[list[str]] = None
    builder: Optional[Callable[[int], nn.Module]] = None
    #: parameters shared between stages (e.g. a tied embedding and output layer)
    ties: tuple[Tie, ...] = ()
    #: saved in every checkpoint's common file (e.g. a Hugging Face config, for merging)
    checkpoint_extra: Optional[dict[str, Any]] = None
    #: its stages run their attention through :func:`hvdhybrid.parallel.recompute.attention`
    #: (``--recompute selective`` applies)
    attention: bool = False

    def __post_init__(self) -> None:
        if (self.stages is None) == (self.builder is None):
            raise ValueError("give a StagedModel either its stage modules or a builder, not both")
        if self.stages is not None and len(self.stages) != self.graph.num_stages:
            raise ValueError(f"{len(self.stages)} stage modules for a graph of "
                             f"{self.graph.num_stages} stages")
        for t in self.ties:
            bad = [s for s in t.names if not 0 <= s < self.graph.num_stages]
            if bad:
                raise ValueError(f"tie {t.name} names stages {bad} outside the graph")

    def build(self, stage: int) -> nn.Module:
        """The module of ``stage``, its tied parameters tagged (see :mod:`ownership`)."""
        m = self.stages[stage] if self.stages is not None else self.builder(stage)  # type: ignore[misc]
        for t in self.ties:
            if stage in t.names:
                p = self._param(stage, m, t.names[stage])
                prev = owner_of(p)  # a tensor-parallel layer may have sharded it already
                tag(p, Tied(t.name, t.stages, prev if isinstance(prev, Sharded) else None))
        return m

    def _param(self, stage: int, module: nn.Module, full: str) -> nn.Parameter:
        named = self.stage_parameters(stage, module)
        if full not in named:
            raise ValueError(f"tie: stage {stage} has no parameter {full!r}; it has "
                             f"{sorted(named)[:8]}")
        p = named[full]
        assert isinstance(p, nn.Parameter)
        return p

    def share_local_ties(self, modules: dict[int, nn.Module]) -> None:
        """Where one rank holds several stages of a tie, make them one Parameter object."""
        for t in self.ties:
            local = [s for s in t.stages if s in modules]
            if len(local) < 2:
                continue
            keep = self._param(local[0], modules[local[0]], t.names[local[0]])
            for s in local[1:]:
                prefix = self.prefixes[s] if self.prefixes else ""
                path = t.names[s][len(prefix):].split(".")
                owner = modules[s].get_submodule(".".join(path[:-1]))
                setattr(owner, path[-1], keep)

    def stage_parameters(self, stage: int, module: nn.Module) -> dict[str, torch.Tensor]:
        """Parameters of ``stage``'s ``module`` by full-model name."""
        prefix = self.prefixes[stage] if self.prefixes else ""
        return {prefix + n: p for n, p in module.named_parameters(remove_duplicate=False)}

    def stage_buffers(self, stage: int, module: nn.Module) -> dict[str, torch.Tensor]:
        """Persistent buffers of ``stage``'s ``module`` by full-model name."""
        prefix = self.prefixes[stage] if self.prefixes else ""
        sd = module.state_dict(keep_vars=True)
        params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        return {prefix + n: b for n, b in sd.items() if n not in params}

    def full(self, modules: Optional[dict[int, nn.Module]] = None) -> Callable[[Any], Any]:
        """The unsplit forward (single process), for references and evaluation."""
        mods = modules if modules is not None else {s: self.build(s) for s in range(self.graph.num_stages)}
        self.share_local_ties(mods)

        def run(inputs: Any) -> Any:
            outs: dict[int, Any] = {}
            for s in range(self.graph.num_stages):
                args = [inputs] if s in self.graph.batch_stages else []
                args += [outs[u] for u in self.graph.upstream(s)]
                outs[s] = mods[s](*args)
            return outs[self.graph.sink]
        return run

    def parameter_count(self) -> int:
        """Parameters of the whole model (tied ones once, a sharded one at its whole size), without
        materialising a builder's stages."""
        total = 0
        shared = {t.names[s] for t in self.ties for s in t.stages[1:]}
        for s in range(self.graph.num_stages):
            if self.stages is not None:
                m = self.stages[s]
            else:
                with torch.device("meta"):
                    m = self.builder(s)  # type: ignore[misc]
            # one Parameter under two names (a tie within the stage) counts once
            unique = {id(p): p for n, p in self.stage_parameters(s, m).items() if n not in shared}
            total += sum(_whole_numel(p) for p in unique.values())
        return total


def _whole_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter that ``p`` is (a shard: all shards, without padding)."""
    shard = shard_of(owner_of(p))
    if shard is None:
        return p.numel()
    return (p.numel() // p.shape[shard.dim]) * (p.shape[shard.dim] * shard.size - shard.pad)


def mount(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at dotted ``path`` under ``root`` (empty containers made on the way), so a
    stage's parameters carry the full model's names (``transformer.h.3.attn.c_attn.weight``)."""
    *parents, leaf = path.split(".")
    node = root
    for p in parents:
        if not hasattr(node, p):
            node.add_module(p, nn.Module())
        node = getattr(node, p)
    node.add_module(leaf, module)


def partition_sizes(layers: Sequence[nn.Module], num_stages: int, strategy: str,
                    sample: torch.Tensor | None = None) -> list[int]:
    """Layer counts per stage for ``strategy`` (``uniform``, ``params`` or ``time``).

    ``time`` measures on this rank: under MPI compute it on one rank and
    broadcast it, or stages will disagree about where the cuts are.
    """
    try:
        fn = STRATEGIES[strategy]
    except KeyError:
        raise PartitionError(
            f"unknown partition {strategy!r}; choose one of {', '.join(STRATEGIES)}") from None
    return fn(layers, num_stages, sample)


def _check_sizes(sizes: Sequence[int], n_layers: int) -> None:
    if sum(sizes) != n_layers or any(n < 1 for n in sizes):
        raise PartitionError(f"stage sizes {list(sizes)} do not cover {n_layers} layers")


def split_sequential(layers: Sequence[nn.Module], sizes: Sequence[int],
                     loss_fn: Callable[[Any, Any], torch.Tensor]) -> StagedModel:
    """Cut built ``layers`` into a chain of parts with ``sizes`` layers each (build-then-drop)."""
    _check_sizes(sizes, len(layers))
    parts: list[nn.Module] = []
    first = 0
    for n in sizes:
        parts.append(Part(layers[first:first + n], first))
        first += n
    return StagedModel(StageGraph.chain(len(sizes)), parts, loss_fn)


def keyed(seed: int, key: int, fn: Callable[[], T]) -> T:
    """Build ``fn()`` under a generator seeded by ``(seed, key)``; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + key * 7_919 + 17) % (2 ** 63))
        return fn()


def keyed_layers(fns: Sequence[LayerFn], seed: int) -> list[nn.Module]:
    """Every layer, built as :func:`sequential_model` builds it (the single-process model)."""
    return [keyed(seed, i, f) for i, f in enumerate(fns)]


def meta_layers(fns: Sequence[LayerFn]) -> list[nn.Module]:
    """Every layer on the meta device: shapes and parameter counts, no memory."""
    with torch.device("meta"):
        return [f() for f in fns]


def sequential_model(fns: Sequence[LayerFn], sizes: Sequence[int],
                     loss_fn: Callable[[Any, Any], torch.Tensor], seed: int) -> StagedModel:
    """A chain whose stage ``s`` builds only its layers, each keyed by ``(seed, layer index)``.

    Any layout starts from the parameters of ``nn.Sequential(*keyed_layers(fns, seed))``.
    """
    _check_sizes(sizes, len(fns))
    firsts = [sum(sizes[:s]) for s in range(len(sizes))]

    def build(stage: int) -> nn.Module:
        lo = firsts[stage]
        return Part([keyed(seed, i, fns[i]) for i in range(lo, lo + sizes[stage])], lo)
    return StagedModel(StageGraph.chain(len(sizes)), None, loss_fn, builder=build)
