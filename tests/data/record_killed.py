"""Records 10 steps of SGD with Nesterov momentum on random data, then kills itself (SIGKILL)
in the middle of step 11, as a crash would: tests/trajectory/test_recorded_run.cpp reads what is left."""
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
from pathkernel_record import Recorder  # noqa: E402

torch.manual_seed(0)
X, y = torch.randn(200, 1, 6, 6), torch.randint(0, 4, (200,))
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
rec = Recorder(sys.argv[1], model, opt, train=(X, y))
for step in range(20):
    idx = torch.arange(step * 10, step * 10 + 10)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
    loss.backward()
    opt.step()
    if step == 10:
        os.kill(os.getpid(), signal.SIGKILL)
    rec.step(idx, loss)
