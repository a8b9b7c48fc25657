"""OSLO's tensor + data parallel GPT-2 workflow on hvdhybrid: groups, a stock Hugging Face model
parallelized in place, your own loop, a parallel checkpoint, merged for from_pretrained.
Run: mpirun -np 4 python -m mpi4py docs/examples/gpt2_tensor_data.py OUT   (tensor 2 x data 2;
-m mpi4py ends every rank if one raises)"""
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hvdhybrid as hh
from hvdhybrid.models.gpt2.data import chunks, shakespeare

out = sys.argv[1]
groups = hh.init(tensor=2)  # tensor 2; the other ranks are data-parallel bundles
print(f"rank {groups.world.Get_rank()}: data {groups.data_rank}/{groups.data_size}, tensor "
      f"{groups.tensor_rank}/{groups.tensor_size}, pipeline {groups.pipeline_rank}/{groups.pipeline_size}")
torch.manual_seed(0)
config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)  # byte-level
model = GPT2LMHeadModel(config)  # a stock model, no download
staged = hh.parallelize_gpt2(model, groups)  # in place: heads, MLP and vocabulary split over 2 ranks
data = chunks(shakespeare(), 32, limit=512)  # windows of 32 bytes and their next bytes
cfg = hh.TrainConfig(steps=20, batch_size=16, microbatches=2, out=out, progress=False)
trainer = hh.Trainer(groups, staged, lambda params: torch.optim.AdamW(params, lr=3e-3), cfg)
sampler = hh.Sampler(len(data), cfg.optim.batch_size, seed=0)  # global batches; each bundle takes its share
for step in range(1, cfg.optim.steps + 1):
    loss = trainer.train_step(data, sampler.next())
    if groups.world.Get_rank() == 0 and step % 5 == 0:
        print(f"step {step} loss {loss:.4f}", flush=True)
trainer.save_checkpoint()  # every rank its shard, by full name and slice, the layout recorded
if groups.world.Get_rank() == 0:
    merged = hh.merge_gpt2(out, f"{out}/merged")  # one ordinary checkpoint
    again = GPT2LMHeadModel.from_pretrained(f"{out}/merged")
    print(f"merged {sum(p.numel() for p in again.parameters())} parameters into {out}/merged")
hh.finish(groups)
