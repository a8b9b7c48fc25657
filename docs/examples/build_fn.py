"""A build function for `hvdtrain run`: your model and data, every hvdtrain option.

    mpirun -np 4 bin/hvdtrain run docs/examples/build_fn.py:build --stages 2 --arg hidden=64
"""
import torch
from torch import nn

import hvdhybrid as hh


def build(stages: int, hidden: str = "32") -> hh.Job:
    h = int(hidden)  # --arg values arrive as strings
    g = torch.Generator().manual_seed(0)
    x = torch.randn(640, 20, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    layers = [lambda: nn.Sequential(nn.Linear(20, h), nn.ReLU()),  # factories: each rank builds its own
              lambda: nn.Sequential(nn.Linear(h, h), nn.ReLU(), hh.KeyedDropout(0.1, "drop")),
              lambda: nn.Sequential(nn.Linear(h, h), nn.ReLU()),
              lambda: nn.Linear(h, 3)]
    return hh.Job(model=layers, train_set=hh.TensorDataset(x[:512], y[:512]),
                  eval_set=hh.TensorDataset(x[512:], y[512:]))
