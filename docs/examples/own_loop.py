"""Your own model and loop on hvdhybrid.  Run: mpirun -np 4 python docs/examples/own_loop.py"""
import torch
from torch import nn

import hvdhybrid as hh


def layer_fns() -> list:  # factories: each rank builds only the layers of its own stages
    return [lambda: nn.Sequential(nn.Linear(20, 64), nn.ReLU()),
            lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), hh.KeyedDropout(0.1, "drop1")),
            lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU()),
            lambda: nn.Linear(64, 3)]


g = torch.Generator().manual_seed(0)
x = torch.randn(512, 20, generator=g)
data = hh.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long())

stages = 2 if hh.world_size() % 2 == 0 else 1  # 2 pipeline stages per bundle, bundles for the rest
groups = hh.init(stages=stages)
model = hh.sequential_model(layer_fns(), [4 // stages] * stages, nn.functional.cross_entropy, seed=0)
cfg = hh.TrainConfig(steps=20, batch_size=64, microbatches=2, fp16_compression=False, progress=False)
trainer = hh.Trainer(groups, model, lambda params: torch.optim.Adam(params, lr=1e-2), cfg)
sampler = hh.Sampler(len(data), cfg.optim.batch_size, seed=0)
for step in range(1, cfg.optim.steps + 1):  # your loop: one optimizer step (all ranks) per call
    loss = trainer.train_step(data, sampler.next())
    if groups.world.Get_rank() == 0 and step % 5 == 0:
        print(f"step {step} loss {loss:.4f}", flush=True)
params = trainer.gather_parameters()  # the whole model, by name, on rank 0
if params is not None:
    print(f"checksum {sum(float(p.double().abs().sum()) for p in params.values()):.10f}")
hh.finish(groups)
