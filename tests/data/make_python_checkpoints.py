"""Writes the checkpoint fixtures of tests/train/test_checkpoint.cpp with Python's torch.save.

Run with Debian's python3-torch: python3 tests/data/make_python_checkpoints.py
The files are committed; this script documents what they hold.
"""
import collections
import os

import torch

here = os.path.dirname(os.path.abspath(__file__))

# A state_dict as nn.Module.state_dict() returns it (an OrderedDict with _metadata), with views:
# a transposed (non-contiguous) tensor and a slice at an offset into a shared storage.
base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
shared = torch.arange(10, dtype=torch.float64)
sd = collections.OrderedDict()
sd["layer.weight"] = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4
sd["layer.bias"] = torch.tensor([0.5, -1.5], dtype=torch.float64)
sd["transposed"] = base.t()
sd["slice"] = shared[3:7]
sd["same_storage"] = shared[::3]
sd._metadata = collections.OrderedDict([("", {"version": 1}), ("layer", {"version": 1})])
torch.save(sd, os.path.join(here, "python_state_dict.pt"))

# torch.optim.Adam's state_dict after two steps of a Linear(3, 2).
torch.manual_seed(0)
model = torch.nn.Linear(3, 2)
opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.99))
for _ in range(2):
    opt.zero_grad()
    model(torch.ones(4, 3)).pow(2).sum().backward()
    opt.step()
torch.save(opt.state_dict(), os.path.join(here, "python_adam_state.pt"))
