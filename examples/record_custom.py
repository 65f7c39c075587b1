"""Record networks the analyzer does not build itself: a small CNN trained with SGD + Nesterov
momentum, or a custom nn.Module with a residual connection and LayerNorm trained with AdamW,
on Fashion-MNIST in plain PyTorch.

    python3 examples/record_custom.py runs/py-cnn --model cnn [--steps 40]
    python3 examples/record_custom.py runs/py-res --model resnorm [--loss mse]
    pathkernel analyze runs/py-res --probes 8 --out runs/py-res-analysis

The CNN is an nn.Sequential the recorder recognizes as the zoo's cnn:8,16:relu (pathkernel's
factorized kernels analyze it); the residual module is analyzed through its TorchScript form,
by autograd (--kernel-route torchscript does that for the CNN too). With --loss mse the targets
are one-hot float32 rows, recorded as they are fed to the loss.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from pathkernel_record import Recorder  # noqa: E402
from record_mlp import fashion_mnist  # noqa: E402


class ResidualNorm(torch.nn.Module):
    """Flatten, a tanh embedding, one residual block h + tanh(W LayerNorm(h)), a linear head."""

    def __init__(self, d_in=784, width=32, outputs=10):
        super().__init__()
        self.embed = torch.nn.Linear(d_in, width)
        self.norm = torch.nn.LayerNorm(width)
        self.inner = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, outputs)

    def forward(self, x):
        h = torch.tanh(self.embed(x.flatten(1)))
        h = h + torch.tanh(self.inner(self.norm(h)))
        return self.head(h)


def build(kind):
    if kind == "cnn":
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(16 * 7 * 7, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    else:
        model = ResidualNorm()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    return model, opt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--model", choices=("cnn", "resnorm"), default="cnn")
    ap.add_argument("--loss", choices=("ce", "mse"), default="ce")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-limit", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    X, y = fashion_mnist(a.data, "train", a.train_limit)
    Xt, yt = fashion_mnist(a.data, "test", 500)
    if a.loss == "mse":  # the targets exactly as the loss sees them
        y = torch.nn.functional.one_hot(y, 10).float()
        yt = torch.nn.functional.one_hot(yt, 10).float()
    model, opt = build(a.model)
    rec = Recorder(a.out, model, opt, train=(X, y), test=(Xt, yt), loss=a.loss)
    g = torch.Generator().manual_seed(a.seed)
    for step in range(a.steps):
        idx = torch.randint(0, X.shape[0], (a.batch,), generator=g)
        opt.zero_grad()
        out = model(X[idx])
        if a.loss == "ce":
            loss = torch.nn.functional.cross_entropy(out, y[idx])
        else:  # pathkernel's MSE: the mean over the batch of half the summed squared error
            loss = 0.5 * ((out - y[idx]) ** 2).sum(1).mean()
        loss.backward()
        opt.step()
        rec.step(idx, loss)
    rec.close()
    with torch.no_grad():
        acc = (model(Xt).argmax(1) == (yt if yt.dim() == 1 else yt.argmax(1))).float().mean().item()
    print("recorded %d steps of %s into %s (test accuracy %.3f)" % (a.steps, a.model, a.out, acc))


if __name__ == "__main__":
    main()
