"""Peer: one process, one thread, the whole model on the whole batch (and on 8 microbatches).

    python bench/single.py [--model mlp|gpt2]
"""

from __future__ import annotations

import sys

import torch
from common import (
    MICRO,
    emit,
    median,
    model_arg,
    model_batch,
    model_loss,
    model_parts,
    model_rows,
    one_thread,
    time_steps,
)
from torch import nn


def main(argv: list[str]) -> None:
    one_thread()
    name, _ = model_arg(argv)
    model = nn.Sequential(*model_parts(name, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = model_batch(name)
    loss = model_loss(name)
    steps = 10 if name == "mlp" else 4

    def full() -> None:
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()

    def micro() -> None:
        opt.zero_grad()
        for xs, ys in zip(x.chunk(MICRO), y.chunk(MICRO)):
            (loss(model(xs), ys) / MICRO).backward()
        opt.step()

    tag = "" if name == "mlp" else f"{name}-"
    rows = model_rows(name)
    emit({"name": f"{tag}single", "batch": rows, "step_s": median(time_steps(full, 2, steps))})
    emit({"name": f"{tag}single-microbatched", "batch": rows, "step_s": median(time_steps(micro, 2, steps))})


if __name__ == "__main__":
    main(sys.argv[1:])
