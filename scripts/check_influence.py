#!/usr/bin/env python3
"""Recompute `pathkernel influence`'s TracInCP matrix independently, the way Captum's TracInCP
does: per-example loss gradients over every parameter by functorch (vmap of grad), at each
checkpoint the run's state_dict loaded into the equivalent torch.nn model, in float64, summed
over the checkpoints with their learning rates; compare with influence.npy and
self_influence.npy.

usage: check_influence.py RUN INFLUENCE [--tol 1e-9] [--weights STEP=FILE ...]
A checkpoint step the run did not store is read from the state_dict FILE given for it (written
by `pathkernel replay RUN --step STEP --out FILE`).
Prints the largest relative errors (max |diff| / max |value|) as JSON; exits 1 above --tol.
"""
import argparse, csv, json, os, sys

import numpy as np
import torch
from functorch import grad, make_functional, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_checkpoint import build, read_idx  # noqa: E402


def per_example_grads(fmodel, params, x, y, loss):
    """[N, n_params]: the gradient of each example's loss (not averaged), as Captum takes it."""
    def one(p, xi, yi):
        out = fmodel(p, xi.unsqueeze(0))
        if loss == "ce":
            return torch.nn.functional.cross_entropy(out, yi.unsqueeze(0), reduction="sum")
        target = torch.nn.functional.one_hot(yi, out.shape[1]).double().unsqueeze(0)
        return 0.5 * ((out - target) ** 2).sum()
    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([t.reshape(x.shape[0], -1) for t in g], dim=1).detach()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("influence")
    ap.add_argument("--tol", type=float, default=1e-9)
    ap.add_argument("--weights", action="append", default=[])
    args = ap.parse_args()
    given = {int(w.split("=", 1)[0]): w.split("=", 1)[1] for w in args.weights}
    torch.set_default_dtype(torch.float64)
    manifest = json.load(open(os.path.join(args.run, "manifest.json")))
    if manifest.get("format") != "pathkernel-run/1":
        sys.exit("check_influence.py: runs of pathkernel train only (this is %s)" % manifest.get("format"))
    summary = json.load(open(os.path.join(args.influence, "summary.json")))
    files, norm = manifest["data"]["files"], manifest["data"]["normalization"]

    def inputs(key, rows):  # the rows as training fed them (only those: all would be 376 MB in float64)
        x = torch.from_numpy(read_idx(files[key]["path"])[rows].astype(np.float64)).unsqueeze(1) / 255.0
        return (x - norm["mean"]) / norm["std"]

    split = summary["split"]
    probes = torch.tensor(summary["probes"])
    xs = inputs("test_images" if split == "test" else "train_images", probes.numpy())
    ys = torch.from_numpy(read_idx(files["test_labels" if split == "test" else "train_labels"]["path"]).astype(np.int64))[probes]
    n = summary["train_examples"]
    xt = inputs("train_images", slice(0, n))
    yt = torch.from_numpy(read_idx(files["train_labels"]["path"]).astype(np.int64))[:n]
    rates = [(int(r["step"]), float(r["lr"])) for r in csv.DictReader(open(os.path.join(args.influence, "checkpoints.csv")))]

    ref = torch.zeros(len(probes), n)
    ref_self = torch.zeros(n)
    model = build(manifest).double()
    for step, lr in rates:
        sd = torch.load(given.get(step, os.path.join(args.run, "checkpoints", "step_%08d.pt" % step)))
        model.load_state_dict({k: v.double() for k, v in sd.items()})
        fmodel, params = make_functional(model)
        gs = per_example_grads(fmodel, params, xs, ys, manifest["loss"])
        for start in range(0, n, 250):
            gt = per_example_grads(fmodel, params, xt[start:start + 250], yt[start:start + 250], manifest["loss"])
            ref[:, start:start + 250] += lr * (gs @ gt.T)
            ref_self[start:start + 250] += lr * (gt ** 2).sum(1)
    got = np.load(os.path.join(args.influence, "influence.npy"))
    got_self = np.load(os.path.join(args.influence, "self_influence.npy"))
    err = float(np.abs(got - ref.numpy()).max() / max(np.abs(ref.numpy()).max(), 1e-300))
    err_self = float(np.abs(got_self - ref_self.numpy()).max() / max(np.abs(ref_self.numpy()).max(), 1e-300))
    print(json.dumps({"checkpoints": [s for s, _ in rates], "shape": list(got.shape),
                      "max_relative_error": {"influence": err, "self_influence": err_self}, "tol": args.tol}))
    return 0 if err <= args.tol and err_self <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
