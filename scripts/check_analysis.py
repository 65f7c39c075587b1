#!/usr/bin/env python3
"""Recompute D, F, K and R of an analysis independently, in float64 PyTorch, from the run's
checkpoints (so the run needs checkpoints at k and k+1 of every step checked), with explicit
per-row Jacobians, and compare with the analysis's arrays. For a recorded run
(python/pathkernel_record.py) the model is the run's own TorchScript file and the data its .npy
files, so the check also covers pathkernel's recognition of the model.

usage: check_analysis.py RUN ANALYSIS [--steps K1,K2,...] [--tol 1e-9] [--wrong-context]

A `pathkernel train` run of a `:dropout=P` or `:bn` model: each step's batch runs with the masks
drawn again in Python from the run's seed and BatchNorm in training mode
(check_checkpoint.native_training_forward), the probes as predicted.
Prints the largest relative error per quantity (max |diff| / max |value| over each step);
exits 1 when one exceeds --tol.
"""
import argparse, contextlib, csv, json, os, sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_checkpoint import build, native_masks, native_training_forward, read_idx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from pathkernel_record import training_forward  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("analysis")
    ap.add_argument("--steps", default="")
    ap.add_argument("--tol", type=float, default=1e-9)
    ap.add_argument("--wrong-context", action="store_true",
                    help="a native run's batch with step k + 1's Dropout masks and BatchNorm on its running "
                         "statistics (a test that the check can fail)")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    manifest = json.load(open(os.path.join(args.run, "manifest.json")))
    log = [json.loads(line) for line in open(os.path.join(args.run, "steps.jsonl"))]
    rows = list(csv.DictReader(open(os.path.join(args.analysis, "steps.csv"))))
    analyzed = [int(r["step"]) for r in rows]
    probes = list(csv.DictReader(open(os.path.join(args.analysis, "probes.csv"))))
    summary = json.load(open(os.path.join(args.analysis, "summary.json")))
    split = summary["settings"]["split"]
    order = []
    for p in probes:
        if int(p["probe"]) not in order:
            order.append(int(p["probe"]))
    outputs = np.load(os.path.join(args.analysis, "arrays", "outputs.npy"))
    quantities = ["D", "F", "K", "R"]
    # S = 1/2 dw^T H_row dw when the analysis has it: checked row by row as a Hessian-vector
    # product (second derivatives only; differentiating a double backward again is wrong for
    # layer_norm in torch 1.13).
    if os.path.exists(os.path.join(args.analysis, "arrays", "S.npy")):
        quantities.append("S")
    if os.path.exists(os.path.join(args.analysis, "arrays", "U_stats.npy")):
        quantities.append("U_stats")
    arrays = {q: np.load(os.path.join(args.analysis, "arrays", q + ".npy")) for q in quantities}

    ckdir = os.path.join(args.run, "checkpoints")
    steps = [int(s) for s in args.steps.split(",")] if args.steps else analyzed[:3]
    recorded = manifest.get("format") == "pathkernel-recorded-run/1"
    if recorded:
        def npy(split, part):
            return torch.from_numpy(np.load(os.path.join(args.run, manifest["data"][split][part])))
        def as_fed(x):  # float64 inputs for the float64 model; int64 tokens as they are
            return x.double() if x.is_floating_point() else x
        xtrain, ytrain = as_fed(npy("train", "x")), npy("train", "y")
        xsplit = as_fed(npy(split, "x"))

        def model_at(step, buffers_of=None):
            """The weights after `step` steps; BatchNorm's running statistics after `buffers_of`."""
            m = torch.jit.load(os.path.join(args.run, "model.pt")).double()
            sd = torch.load(os.path.join(ckdir, "step_%08d.pt" % step))
            if buffers_of is not None:
                sd_b = torch.load(os.path.join(ckdir, "step_%08d.pt" % buffers_of))
                sd.update({n: sd_b[n] for n, _ in m.named_buffers()})
            m.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in sd.items()})
            return m
    else:
        files = manifest["data"]["files"]
        norm = manifest["data"]["normalization"]

        class Images:
            """The IDX images as training fed them (float64, normalized), made only for the rows
            indexed: all 60000 in float64 would be 376 MB a copy."""
            def __init__(self, raw):
                self.raw = raw

            def __getitem__(self, i):
                x = torch.from_numpy(self.raw[np.asarray(i)].astype(np.float64)).unsqueeze(1) / 255.0
                return (x - norm["mean"]) / norm["std"]

        xtrain = Images(read_idx(files["train_images"]["path"]))
        ytrain = torch.from_numpy(read_idx(files["train_labels"]["path"]).astype(np.int64))
        xsplit = xtrain if split != "test" else Images(read_idx(files["test_images"]["path"]))

        def model_at(step, buffers_of=None):
            """The weights after `step` steps; BatchNorm's running statistics after `buffers_of`."""
            m = build(manifest).double()
            sd = torch.load(os.path.join(ckdir, "step_%08d.pt" % step))
            if buffers_of is not None:
                sd_b = torch.load(os.path.join(ckdir, "step_%08d.pt" % buffers_of))
                sd.update({n: sd_b[n] for n, _ in m.named_buffers()})
            m.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in sd.items()})
            return m
    xp = xsplit[order]

    worst = {q: 0.0 for q in quantities}
    for k in steps:
        i = analyzed.index(k)
        m0, m1 = model_at(k), model_at(k + 1)
        params = list(m0.parameters())
        dw = torch.cat([(b - a).detach().reshape(-1) for a, b in zip(m0.parameters(), m1.parameters())])
        out = m0(xp)
        cols = torch.from_numpy(outputs)
        rows_f = out.gather(1, cols)
        jac = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, params, retain_graph=True)])
                           for f in rows_f.reshape(-1)])
        batch = torch.tensor(log[k]["batch"])
        assert int(batch.max()) < len(ytrain), "a batch index past the training set"
        x_b = xtrain[batch]
        # The batch as training computed it: its Dropout masks, BatchNorm on the batch's statistics.
        if recorded:
            step_forward = training_forward(m0, args.run, log[k])
        elif args.wrong_context:  # step k + 1's masks, BatchNorm left on its running statistics
            m0.masks = native_masks(manifest, m0, k + 1, len(batch)) or None
            step_forward = contextlib.nullcontext()
        else:
            step_forward = native_training_forward(manifest, m0, k, len(batch))
        with step_forward:
            logits = m0(x_b)
            if manifest["loss"] == "ce":
                loss = torch.nn.functional.cross_entropy(logits, ytrain[batch])
            else:  # class labels as one-hot rows; a recorded run's float targets as they are
                y_b = ytrain[batch]
                target = y_b.double() if y_b.is_floating_point() else torch.nn.functional.one_hot(y_b, logits.shape[1])
                loss = 0.5 * ((logits - target) ** 2).sum(1).mean()
            grad_l = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        if not recorded:
            m0.masks = None  # the probes as predicted
        with torch.no_grad():
            ref = {"D": (m1(xp) - m0(xp)).gather(1, cols).numpy()}
        ref["F"] = (jac @ dw).reshape(rows_f.shape).detach().numpy()
        ref["K"] = (-log[k]["lr"] * (jac @ grad_l)).reshape(rows_f.shape).detach().numpy()
        ref["R"] = ref["D"] - ref["F"]
        if "U_stats" in quantities:  # BatchNorm's running statistics: f(w_{k+1}, b_{k+1}) - f(w_{k+1}, b_k)
            m1_b0 = model_at(k + 1, buffers_of=k)
            with torch.no_grad():
                ref["U_stats"] = (m1(xp) - m1_b0(xp)).gather(1, cols).numpy()
            ref["R"] = ref["R"] - ref["U_stats"]
        if "S" in quantities:
            dws = [(b - a).detach() for a, b in zip(m0.parameters(), m1.parameters())]
            s_rows = []
            for f in m0(xp).gather(1, cols).reshape(-1):
                g = torch.autograd.grad(f, params, create_graph=True)
                gdw = sum((gi * d).sum() for gi, d in zip(g, dws))
                hv = torch.autograd.grad(gdw, params, retain_graph=True, allow_unused=True) if gdw.requires_grad else [None] * len(params)
                s_rows.append(0.5 * sum(float((h * d).sum()) for h, d in zip(hv, dws) if h is not None))
            ref["S"] = np.array(s_rows).reshape(rows_f.shape)
        for q in quantities:
            err = np.abs(arrays[q][i] - ref[q]).max() / max(np.abs(ref[q]).max(), 1e-300)
            worst[q] = max(worst[q], float(err))
    print(json.dumps({"steps": steps, "max_relative_error": worst, "tol": args.tol}))
    return 0 if all(v <= args.tol for v in worst.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
