#!/usr/bin/env python3
"""Load a pathkernel checkpoint in PyTorch, put it into the equivalent torch.nn model, and
measure its test accuracy: the check that checkpoints are plain state_dicts.

usage: check_checkpoint.py RUN [--step K]     (default: the last checkpoint)
Prints the accuracy and the one in RUN/summary.json; exits 1 if they differ.
"""
import argparse, contextlib, gzip, json, os, sys

import numpy as np
import torch
from torch import nn


class Dense(nn.Module):
    """linear, quadratic:W and mlp:W1,W2,...:ACT[:bn][:dropout=P]. state_dict keys:
    layers.I.weight/bias, norms.I.* (BatchNorm1d after hidden layer I, before its activation)."""

    def __init__(self, n_in, widths, classes, act, dropout=0.0, bn=False):
        super().__init__()
        sizes = [n_in] + widths + [classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(w) for w in widths) if bn else None
        self.act = act
        self.p = dropout
        self.site_shapes = [(w,) for w in widths] if dropout > 0 else []
        self.masks = None  # a step's masks (one per site) in a training forward; None: predictions

    def forward(self, x):
        h = x.flatten(1)
        for i, layer in enumerate(self.layers):
            if i > 0:
                h = self.act(self.norms[i - 1](h) if self.norms is not None else h)
                if self.masks is not None:
                    h = h * (self.masks[i - 1].to(h.dtype) / (1 - self.p))
            h = layer(h)
        return h


class SmallCnn(nn.Module):
    """cnn:C1,C2:ACT[:bn][:dropout=P]. state_dict keys: convs.0.*, convs.1.*, norms.I.* (BatchNorm2d
    after conv I, before its activation), fc.*."""

    def __init__(self, shape, widths, classes, act, dropout=0.0, bn=False):
        super().__init__()
        c, h, w = shape
        self.convs = nn.ModuleList([nn.Conv2d(c, widths[0], 3, padding=1), nn.Conv2d(widths[0], widths[1], 3, padding=1)])
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in widths) if bn else None
        self.fc = nn.Linear(widths[1] * (h // 4) * (w // 4), classes)
        self.act = act
        self.p = dropout
        self.site_shapes = [(widths[1] * (h // 4) * (w // 4),)] if dropout > 0 else []
        self.masks = None

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = conv(x)
            x = torch.max_pool2d(self.act(self.norms[i](x) if self.norms is not None else x), 2)
        x = x.flatten(1)
        if self.masks is not None:
            x = x * (self.masks[0].to(x.dtype) / (1 - self.p))
        return self.fc(x)


ACTS = {"tanh": torch.tanh, "relu": torch.relu, "leaky_relu": nn.functional.leaky_relu, "softplus": nn.functional.softplus,
        "gelu": nn.functional.gelu, "none": lambda x: x}


def build(manifest):
    spec = manifest["model"]["spec"].split(":")
    dropout, bn = 0.0, False
    if spec[-1].startswith("dropout="):
        dropout = float(spec.pop()[len("dropout="):])
    if spec[-1] == "bn":
        bn = bool(spec.pop())
    classes, shape = manifest["model"]["num_classes"], manifest["model"]["input_shape"]
    widths = [int(w) for w in spec[1].split(",")] if len(spec) > 1 else []
    act = ACTS[spec[2]] if len(spec) > 2 else ACTS["none"]
    # eval(): predictions (BatchNorm on its running statistics); a training forward sets modes itself.
    if spec[0] == "cnn":
        return SmallCnn(shape, widths, classes, act, dropout, bn).eval()
    return Dense(int(np.prod(shape)), widths, classes, act, dropout, bn).eval()


def native_masks(manifest, model, step, rows):
    """Step `step`'s Dropout masks in a `pathkernel train` run (docs/train.md): a CPU generator
    seeded with seed * 1000003 + step (mod 2^64) draws float32 Bernoulli(1 - p) values of
    [rows, *shape] for each site in forward order."""
    g = torch.Generator().manual_seed((manifest["seed"] * 1000003 + step) % 2**64)
    return [torch.empty((rows,) + shape, dtype=torch.float32).bernoulli_(1 - model.p, generator=g).to(torch.uint8)
            for shape in model.site_shapes]


@contextlib.contextmanager
def native_training_forward(manifest, model, step, rows):
    """`model` (build()) as step `step` of a `pathkernel train` run trained, inside the with-block:
    its Dropout sites with the step's masks, its BatchNorm modules in training mode (their running
    statistics restored on leaving); predictions again afterwards."""
    norms = list(model.norms) if model.norms is not None else []
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    model.masks = native_masks(manifest, model, step, rows) or None
    for m in norms:
        m.train(True)
    try:
        yield model
    finally:
        model.masks = None
        with torch.no_grad():
            for m, (mean, var, n) in zip(norms, saved):
                m.train(False)
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n)


def read_idx(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--step", type=int)
    args = ap.parse_args()
    manifest = json.load(open(os.path.join(args.run, "manifest.json")))
    ckdir = os.path.join(args.run, "checkpoints")
    steps = sorted(int(f[5:13]) for f in os.listdir(ckdir) if f.endswith(".pt") and not f.endswith(".state.pt"))
    step = args.step if args.step is not None else steps[-1]
    state_dict = torch.load(os.path.join(ckdir, "step_%08d.pt" % step))
    model = build(manifest).to(getattr(torch, manifest["dtype"]))
    model.load_state_dict(state_dict)  # strict: every key and shape must match

    files = manifest["data"]["files"]
    norm = manifest["data"]["normalization"]
    dtype = getattr(torch, manifest["dtype"])
    x = torch.from_numpy(read_idx(files["test_images"]["path"]).copy()).unsqueeze(1).to(dtype) / 255.0
    if norm["mode"] != "none":
        x = (x - norm["mean"]) / norm["std"]
    y = torch.from_numpy(read_idx(files["test_labels"]["path"]).astype(np.int64))
    with torch.no_grad():
        right = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(y), 1000))
    acc = right / len(y)
    summary = json.load(open(os.path.join(args.run, "summary.json")))
    print(json.dumps({"step": step, "test_accuracy": acc, "summary_test_accuracy": summary["test_accuracy"]}))
    return 0 if abs(acc - summary["test_accuracy"]) < 0.5 / len(y) else 1


if __name__ == "__main__":
    sys.exit(main())
