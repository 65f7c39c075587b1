"""Writes tests/data/python_optimizer_runs.pt: fifty float64 steps of torch.optim's RMSprop,
Adagrad and Adadelta on a small tanh MLP, the reference of tests/train/test_optimizer.cpp
(PythonTorchOptimTest: pathkernel's optimizers must give the same weights and state).

Run with Debian's python3-torch: /usr/bin/python3 tests/data/make_python_optimizer_runs.py
The file is committed; this script documents what it holds:
  x [50, 5, 1, 6, 6] float64, y [50, 5] int64: the batches;
  init.<name>: the initial weights (layers.0.weight [8, 36], layers.0.bias, layers.1.weight
  [3, 8], layers.1.bias, the names of pathkernel's mlp:8:tanh);
  final.<config>.<name>: the weights after 50 steps; state.<config>.<slot>.<name>: the state.
"""
import collections
import os

import torch
import torch.nn.functional as F

here = os.path.dirname(os.path.abspath(__file__))
torch.manual_seed(3)
names = ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
init = [torch.randn(8, 36, dtype=torch.float64) * 0.3, torch.randn(8, dtype=torch.float64) * 0.1,
        torch.randn(3, 8, dtype=torch.float64) * 0.3, torch.randn(3, dtype=torch.float64) * 0.1]
x = torch.rand(50, 5, 1, 6, 6, dtype=torch.float64)
y = torch.randint(0, 3, (50, 5))
configs = collections.OrderedDict([
    ("rmsprop", (torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.01))),
    ("rmsprop_centered_momentum", (torch.optim.RMSprop, dict(lr=0.01, alpha=0.95, momentum=0.9, centered=True,
                                                             weight_decay=0.01))),
    ("adagrad", (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1))),
    ("adadelta", (torch.optim.Adadelta, dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.01))),
])
out = collections.OrderedDict()
out["x"] = x
out["y"] = y
for n, t in zip(names, init):
    out["init." + n] = t
for config, (cls, kwargs) in configs.items():
    params = [t.clone().requires_grad_() for t in init]
    opt = cls(params, **kwargs)
    for k in range(50):
        opt.zero_grad()
        h = torch.tanh(x[k].flatten(1) @ params[0].t() + params[1])
        F.cross_entropy(h @ params[2].t() + params[3], y[k]).backward()
        opt.step()
    for n, p in zip(names, params):
        out["final.%s.%s" % (config, n)] = p.detach().clone()
    for i, n in enumerate(names):
        for slot, t in opt.state[params[i]].items():
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                out["state.%s.%s.%s" % (config, slot, n)] = t.clone()
torch.save(out, os.path.join(here, "python_optimizer_runs.pt"))
