"""The layout chosen for you: the planner weighs every layout of the launch for GPT-2 tiny (tensor,
stages, schedule, microbatches, --zero, --recompute) on costs measured between these ranks, and a
stock Hugging Face model trains in the one it picks.
Run: mpirun -np 4 python -m mpi4py docs/examples/gpt2_auto.py   (any -np; prints the choice)"""
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hvdhybrid as hh
from hvdhybrid.models.gpt2.data import chunks, shakespeare

# the model command the planner measures: the same model, sequence length and batch as below
groups = hh.init(layout="auto", command=["gpt2", "--size", "tiny", "--seq-len", "32", "--batch-size", "16"])
knobs = groups.plan["knobs"]  # schedule, microbatches, zero, recompute, stages_per_rank, placement
if groups.world.Get_rank() == 0:
    print(f"chose tensor {groups.tensor_size} x pipeline {groups.pipeline_size} x data {groups.data_size}, "
          f"{knobs}; predicted {groups.plan['chosen']['step_s']:.4f} s/step", flush=True)
torch.manual_seed(0)
config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)  # gpt2 --size tiny
model = GPT2LMHeadModel(config)
staged = hh.parallelize_gpt2(model, groups, stages_per_rank=knobs["stages_per_rank"])
data = chunks(shakespeare(), 32, limit=512)
cfg = hh.TrainConfig(steps=8, batch_size=16, progress=False, **knobs)
trainer = hh.Trainer(groups, staged, lambda params: torch.optim.SGD(params, lr=0.1), cfg)
sampler = hh.Sampler(len(data), cfg.optim.batch_size, seed=0)
for step in range(1, cfg.optim.steps + 1):
    loss = trainer.train_step(data, sampler.next())
    if groups.world.Get_rank() == 0 and step % 4 == 0:
        print(f"step {step} loss {loss:.4f}", flush=True)
params = trainer.gather_parameters()
if params is not None:
    print(f"checksum {sum(float(p.double().abs().sum()) for p in params.values()):.10f}")
hh.finish(groups)
