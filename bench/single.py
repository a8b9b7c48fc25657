"""Peer: one process, one thread, the whole MLP on the whole batch (and on 8 microbatches)."""

from __future__ import annotations

import torch
from common import BATCH, MICRO, batch, emit, median, mlp_layers, one_thread, time_steps
from torch import nn


def main() -> None:
    one_thread()
    model = nn.Sequential(*mlp_layers())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = batch()

    def full() -> None:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    def micro() -> None:
        opt.zero_grad()
        for xs, ys in zip(x.chunk(MICRO), y.chunk(MICRO)):
            (nn.functional.mse_loss(model(xs), ys) / MICRO).backward()
        opt.step()

    emit({"name": "single", "batch": BATCH, "step_s": median(time_steps(full, 3, 10))})
    emit({"name": "single-microbatched", "batch": BATCH, "step_s": median(time_steps(micro, 3, 10))})


if __name__ == "__main__":
    main()
