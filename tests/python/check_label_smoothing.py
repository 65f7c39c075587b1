"""Independent check of a `pathkernel train --label-smoothing E` run of the linear model on the
first N Fashion-MNIST images, full batch (batch = N), plain SGD: from the checkpoints as
torch.load reads them, step 0's loss is the label-smoothed cross-entropy (F.cross_entropy's, in
float64) and step 1's weights are step 0's minus lr times its gradient. Prints JSON.

usage: /usr/bin/python3 tests/python/check_label_smoothing.py RUN SMOOTHING N
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "examples"))
from record_mlp import fashion_mnist  # noqa: E402


def main():
    run, eps, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    x, y = fashion_mnist("/usr/share/datasets/fashion-mnist", "train", n)
    x = x.flatten(1).double()
    w0, w1 = (torch.load(os.path.join(run, "checkpoints", "step_%08d.pt" % k)) for k in (0, 1))
    step = json.loads(open(os.path.join(run, "steps.jsonl")).readline())
    assert sorted(step["batch"]) == list(range(n)), "not the full batch"
    weight = w0["layers.0.weight"].double().requires_grad_()
    bias = w0["layers.0.bias"].double().requires_grad_()
    logits = x @ weight.t() + bias
    loss = F.cross_entropy(logits, y, label_smoothing=eps)
    gw, gb = torch.autograd.grad(loss, [weight, bias])
    moved = max(float((w1["layers.0.weight"].double() - (weight - step["lr"] * gw)).abs().max()),
                float((w1["layers.0.bias"].double() - (bias - step["lr"] * gb)).abs().max()))
    step_size = float((w1["layers.0.weight"].double() - weight).abs().max())
    print(json.dumps({"loss_error": abs(step["loss"] - float(loss)) / float(loss),
                      "unsmoothed_loss_gap": abs(step["loss"] - float(F.cross_entropy(logits, y))) / float(loss),
                      "update_error": moved / step_size}))


if __name__ == "__main__":
    main()
