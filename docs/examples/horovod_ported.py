"""horovod_script.py on hvdhybrid: the changed lines are marked.  Run: mpirun -np 2 python THIS
Same parameters as the Horovod script. A pipeline too: hh.init(stages=2), sizes [3, 2], -np 4."""
import torch
from torch import nn

import hvdhybrid as hh  # changed: was horovod.torch

groups = hh.init()  # changed: the launch's layout and process groups (one stage: data parallel)
torch.manual_seed(0)
layers = [nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)]
model = hh.split_sequential(layers, [5], nn.functional.cross_entropy)  # changed: cut into 1 stage
g = torch.Generator().manual_seed(0)
x = torch.randn(512, 20, generator=g)
y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
# changed: fp16 compression
cfg = hh.TrainConfig(steps=30, batch_size=64, fp16_compression=True, progress=False)
# changed: the Trainer broadcasts parameters and optimizer state and averages gradients (Horovod)
trainer = hh.Trainer(groups, model, lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9), cfg)
batch = 64
for step in range(30):
    idx = torch.randperm(512, generator=torch.Generator().manual_seed(step))[:batch]
    loss = trainer.train_step(hh.TensorDataset(x, y), idx.tolist())  # changed: the global batch
params = trainer.gather_parameters()  # changed: the whole model on rank 0
if params is not None:
    print(f"checksum {sum(float(p.double().abs().sum()) for p in params.values()):.10f}")
hh.finish(groups)  # changed: added
