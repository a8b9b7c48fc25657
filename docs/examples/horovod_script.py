"""A plain Horovod data-parallel script, as tutorials end with.  Run: mpirun -np 2 python THIS
Its hvdhybrid port, horovod_ported.py, changes the lines marked there and trains the same parameters."""
import horovod.torch as hvd
import torch
from torch import nn

hvd.init()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
g = torch.Generator().manual_seed(0)
x = torch.randn(512, 20, generator=g)
y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                     compression=hvd.Compression.fp16)
batch, per = 64, 64 // hvd.size()
for step in range(30):
    idx = torch.randperm(512, generator=torch.Generator().manual_seed(step))[:batch]
    mine = idx[hvd.rank() * per:(hvd.rank() + 1) * per]  # this rank's share of the global batch
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x[mine]), y[mine])
    loss.backward()
    optimizer.step()
if hvd.rank() == 0:
    print(f"checksum {sum(float(p.detach().double().abs().sum()) for p in model.parameters()):.10f}")
