"""Train a small MLP on Fashion-MNIST in plain PyTorch and record it for pathkernel.

    python3 examples/record_mlp.py runs/py-mlp [--steps 60] [--train-limit 2000] [--dropout 0.2]
    pathkernel analyze runs/py-mlp --probes 16 --out runs/py-mlp-analysis

Adam with a StepLR schedule; the data is read from Debian's dataset-fashion-mnist package.
"""
import argparse
import gzip
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from pathkernel_record import Recorder  # noqa: E402


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(root, split, limit):
    prefix = "train" if split == "train" else "t10k"
    x = idx(os.path.join(root, "%s-images-idx3-ubyte.gz" % prefix))[:limit]
    y = idx(os.path.join(root, "%s-labels-idx1-ubyte.gz" % prefix))[:limit]
    return torch.tensor(x, dtype=torch.float32).unsqueeze(1) / 255.0, torch.tensor(y, dtype=torch.int64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-limit", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dropout", type=float, default=None,
                    help="add Dropout(P) (kept in eval mode: recorded with dropout off) and an nn.Identity")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    X, y = fashion_mnist(a.data, "train", a.train_limit)
    Xt, yt = fashion_mnist(a.data, "test", 500)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    if a.dropout is not None:  # identities in the chain: the recorder still recognizes mlp:64:tanh
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.Tanh(),
                                    torch.nn.Dropout(a.dropout).eval(), torch.nn.Identity(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    rec = Recorder(a.out, model, opt, train=(X, y), test=(Xt, yt), loss="ce")
    g = torch.Generator().manual_seed(a.seed)
    for step in range(a.steps):
        idx_ = torch.randint(0, X.shape[0], (a.batch,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[idx_]), y[idx_])
        loss.backward()
        opt.step()
        rec.step(idx_, loss)
        sched.step()
    rec.close()
    with torch.no_grad():
        acc = (model(Xt).argmax(1) == yt).float().mean().item()
    print("recorded %d steps into %s (test accuracy %.3f)" % (a.steps, a.out, acc))


if __name__ == "__main__":
    main()
