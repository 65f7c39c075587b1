#!/usr/bin/python3
"""What recording costs a PyTorch training loop: the same loop on Fashion-MNIST, plain and with
the five lines of python/pathkernel_record.py, in one process, the two alternating.

Each model trains --steps steps (batch 64, SGD with momentum 0.9, the same batches both ways)
from the same initial weights; a repeat times one plain and one recorded pass (the recorded one
into a fresh folder, deleted after), and the overhead is the median over the repeats of
recorded / plain - 1. The recorder's own time is split by part with time.perf_counter around its
methods (writing the step's checkpoint files, the gradient's fingerprint, the checks of the loss,
the constants and .grad, comparing the fed inputs with the stored rows, writing Dropout masks),
summed over the recorded passes, per step and as a share of the recorded step; beside their sum,
the recorded passes' time minus the plain ones' (the parts plus the hooks, the mode checks and the
step's log line, plus the timing noise of the loop itself).

Models: mlp (nn.Sequential Flatten, Linear 784-128, Tanh, Linear 128-10: the zoo's mlp:128:tanh),
mnist (pytorch/examples mnist's Net, 1.2M parameters, Dropout on: each step's masks kept),
cnn (a conv stem, two 3x3 conv blocks with BatchNorm in training mode, a linear head).

usage: /usr/bin/python3 bench/bench_recorder.py [--steps 30] [--repeats 3] [--models mlp,mnist,cnn]
       [--data /usr/share/datasets/fashion-mnist]
"""
import argparse
import ctypes
import ctypes.util
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import pathkernel_record  # noqa: E402
from pathkernel_record import Recorder  # noqa: E402
from record_examples_mnist import Net  # noqa: E402
from record_mlp import fashion_mnist  # noqa: E402

# The recorder's parts, timed by wrapping its methods (name in the table: method).
# None of them calls another; what is left (the forward and backward hooks, the mode checks, the
# step's log line) is reported as the rest.
PARTS = {"checkpoint files": "_save", "gradient fingerprint": "_gradient_fingerprint",
         "loss, constants, .grad checks": "_step_loss", "inputs compared": "_store_inputs",
         "masks written": "_write_masks"}


def blas_core():
    """OpenBLAS's kernel set, as it chose it (OPENBLAS_CORETYPE when the environment sets it)."""
    for name in ("libopenblas.so.0", ctypes.util.find_library("openblas") or "", "libblas.so.3"):
        try:
            lib = ctypes.CDLL(name)
            lib.openblas_get_corename.restype = ctypes.c_char_p
            return lib.openblas_get_corename().decode()
        except (OSError, AttributeError):
            continue
    return "unknown (not OpenBLAS)"


class BnCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, stride=2, padding=1)
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = h + self.block(h)
        return self.head(h.mean((2, 3)))


def make_model(name):
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 10))
    if name == "mnist":
        return Net()
    if name == "cnn":
        return BnCnn()
    raise SystemExit("unknown model %r (mlp, mnist, cnn)" % name)


def train(model, opt, X, y, batches, rec=None):
    model.train()
    t = time.perf_counter()
    for idx in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
        if rec is not None:
            rec.step(idx, loss)
    if rec is not None:
        rec.close()
    return time.perf_counter() - t


def timed_parts(spent):
    """Wraps the recorder's methods in PARTS so that their time adds up in spent[label]."""
    originals = {}
    for label, method in PARTS.items():
        original = getattr(Recorder, method)
        originals[method] = original

        def wrapper(self, *a, _original=original, _label=label, **kw):
            t = time.perf_counter()
            try:
                return _original(self, *a, **kw)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - t
        setattr(Recorder, method, functools.wraps(original)(wrapper))
    return originals


def bench(name, X, y, steps, repeats, tmp):
    torch.manual_seed(0)
    start = make_model(name).state_dict()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, X.shape[0], (64,), generator=g) for _ in range(steps)]
    plain, recorded, spent, made = [], [], {}, []
    originals = timed_parts(spent)
    try:
        for r in range(repeats):
            for how in ("plain", "recorded"):
                model = make_model(name)
                model.load_state_dict(start)
                opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
                if how == "plain":
                    torch.manual_seed(2)
                    plain.append(train(model, opt, X, y, batches))
                    continue
                out = os.path.join(tmp, "%s-%d" % (name, r))
                t = time.perf_counter()
                rec = Recorder(out, model, opt, train=(X, y), loss="ce")
                made.append(time.perf_counter() - t)
                torch.manual_seed(2)
                recorded.append(train(model, opt, X, y, batches, rec))
                size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
                shutil.rmtree(out)
    finally:
        for method, original in originals.items():
            setattr(Recorder, method, original)
    ratios = [b / a - 1 for a, b in zip(plain, recorded)]
    params = sum(p.numel() for p in make_model(name).parameters())
    print("%-6s %9d parameters  plain %.4f s/step  recorded %.4f s/step  overhead %+.1f%% (median of %d; "
          "min %+.1f%%, max %+.1f%%)" % (name, params, statistics.median(plain) / steps,
                                          statistics.median(recorded) / steps, 100 * statistics.median(ratios),
                                          repeats, 100 * min(ratios), 100 * max(ratios)))
    total = sum(recorded) - sum(plain)
    print("       Recorder() %.3f s once; run folder %.1f MiB for %d steps (%.2f MiB a step)"
          % (statistics.median(made), size / 2**20, steps, size / 2**20 / steps))
    parts = sum(spent.values())
    for label, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print("       %-30s %7.2f ms/step  %5.1f%% of a recorded step" % (label, 1e3 * s / (steps * repeats),
                                                                       100 * s / sum(recorded)))
    print("       %-30s %7.2f ms/step  (recorded - plain, summed over the repeats: %+.2f ms/step)"
          % ("all timed parts", 1e3 * parts / (steps * repeats), 1e3 * total / (steps * repeats)))
    spent.clear()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="mlp,mnist,cnn")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args()
    torch.set_num_threads(1)
    X, y = fashion_mnist(args.data, "train", 2000)
    print("bench_recorder: torch %s, 1 thread, BLAS core %s, %d steps x %d repeats, batch 64"
          % (torch.__version__, blas_core(), args.steps, args.repeats))
    with tempfile.TemporaryDirectory(prefix="pathkernel-bench-recorder-") as tmp:
        for name in args.models.split(","):
            bench(name, X, y, args.steps, args.repeats, tmp)


if __name__ == "__main__":
    main()
