"""Models given as layer factories (resnet, mlp, `hvdtrain run`): cut by --partition, built keyed, scored."""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..comm.agreement import world
from ..config import Config
from ..parallel.partition import PartitionError
from .session import Built

__all__ = ["accuracy_eval", "classify", "layer_sizes", "sequential_build"]


def classify(out: Any, y: Any) -> tuple[float, int]:
    """Correct predictions and rows of one microbatch (for :func:`accuracy_eval`)."""
    return float((out.argmax(-1) == y).sum()), int(y.shape[0])


def layer_sizes(cfg: Config, fns: list[Any], num_stages: int, train_set: Any) -> list[int]:
    """Layers per stage for ``--partition``; ``time`` is measured on rank 0 (on up to 32 training
    rows) and shared."""
    from ..parallel.staged import keyed_layers, meta_layers, partition_sizes

    how = cfg.parallel.partition
    if how != "time":  # from shapes alone: layers on the meta device hold no memory
        return partition_sizes(meta_layers(fns), num_stages, how)
    got: tuple[Any, Optional[str]] = (None, None)
    if world().Get_rank() == 0:
        try:
            sample = train_set.batch(range(min(32, len(train_set))))[0]
            got = (partition_sizes(keyed_layers(fns, cfg.run.seed), num_stages, "time", sample), None)
        except PartitionError as e:
            got = (None, str(e))
    sizes, error = world().bcast(got, root=0)  # every rank fails alike, or none does
    if error:
        raise PartitionError(error)
    return list(sizes)


def accuracy_eval(metric: Callable[[Any, Any], tuple[float, int]]) -> Callable[[Any, Any], dict[str, float]]:
    """``(trainer, data set) -> {"accuracy" (or "metric"), "rows"}`` over every held-out row."""
    def evaluate(trainer: Any, data: Any) -> dict[str, float]:
        value, rows = trainer.evaluate(data, metric, 256)
        return {"accuracy" if metric is classify else "metric": value, "rows": rows}
    return evaluate


def sequential_build(cfg: Config, fns_fn: Callable[[], list[Any]], dataset: Any,
                     test_fraction: float = 0.2) -> Callable[[int, Any], Built]:
    """A chain of layer factories; each rank builds only its stages' layers (keyed by layer index)."""
    import torch

    from ..parallel.staged import sequential_model

    def build(num_stages: int, layout: Any) -> Built:
        train_set, eval_set = dataset.split(test_fraction, seed=0)
        fns = fns_fn()
        sizes = layer_sizes(cfg, fns, num_stages, train_set)
        model = sequential_model(fns, sizes, torch.nn.functional.cross_entropy, cfg.run.seed)

        def opt(params: Any) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=0.9)
        return Built(model, train_set, {"eval": eval_set}, accuracy_eval(classify), opt)
    return build
