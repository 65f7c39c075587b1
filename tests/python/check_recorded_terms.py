"""Independent float64 check of a recorded run's optimizer kernel term and attributions.

    /usr/bin/python3 tests/python/check_recorded_terms.py RUN ANALYSIS [EXPLANATION]

Recomputes, with PyTorch alone and from the files on disk (model.pt, the state_dict checkpoints,
the optimizer state files torch.optim wrote, steps.jsonl), what pathkernel computed:

  Kopt_k(x, c) = -lr_k * g_c(x; w_k) . r_k (.) P_k (.) sum_{j<=k} c_{k,j} gs_j grad L_j(w_j)

with the coefficients c_{k,j} written out as explicit products of each step's own settings (a
scheduler's momentum or beta1), r_k each parameter group's rate over the first group's, P_k the
preconditioner of Adam, RMSprop, Adagrad or Adadelta from the state torch.optim saved (P_j in
place of P_k for RMSprop with momentum, whose buffer holds preconditioned gradients), and gs_j a
recorded clipping scale. No recurrence, no pathkernel code. With an explanation, the same sum split over
training examples (a_i = sum over the steps j whose batch held i, of -(gs_j / |B_j|) grad l_i(w_j)
times the same coefficients) for each probe's explained logit.

And a bound on Uopt_round_k = F_k - Kopt_k - Uopt_wd_k that float32 training can reach, per
step: the recorded step dw_k differs from the float64 update only by float32 rounding, each weight i
by at most

  b_i = eps32 (C lr_k r_i sum_j |c_{k,j}| Q_{k,j,i} (G_j + lambda_j W_j) + 4 (|dw_i| + |w_i|))

where G_j and W_j are the largest |gradient| and |weight| of i's tensor at step j (a float32
gradient's error is relative to its tensor's scale, not to its own entry's: measured up to 9 eps32
of it, so C = 64), lambda_j the decay, and Q the factor of gradient j at step k (a preconditioner
divides by the root of the squared gradients, so an entry whose gradient is within rounding of
zero can move by up to the rate: Adagrad's first step). Then |Uopt_round_k(x, c)| <= |J(x, c)| b
entry by entry; the bound is the Frobenius norm over the probes, like Uopt_round_norm.

Prints one JSON line: the largest differences relative to the largest |Kopt| and |a|, and the
bound for each analyzed step (uopt_round_bound, in the order of the analysis' steps).
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
from pathkernel_record import training_forward  # noqa: E402

EPS32 = 2.0 ** -24  # float32's unit roundoff
GRADIENT_ROUNDING = 64  # C: see the bound above
UPDATE_ROUNDING = 4  # w - u and u itself, a few roundings each


def main():
    run, analysis = sys.argv[1], sys.argv[2]
    explanation = sys.argv[3] if len(sys.argv) > 3 else None
    torch.set_default_dtype(torch.float64)
    manifest = json.load(open(os.path.join(run, "manifest.json")))
    steps = [json.loads(line) for line in open(os.path.join(run, "steps.jsonl"))]
    kind = manifest["optimizer"]["name"]
    groups = manifest["optimizer"]["param_groups"]
    every = [p[0] for p in manifest["model"]["parameters"]]  # the optimizer's, in its order
    position = {n: i for i, n in enumerate(every)}  # the state files' keys
    frozen = manifest["model"].get("frozen", [])
    names = [n for n in every if n not in frozen]  # the kernel is over the trained parameters
    group_of = {n: 0 for n in names}
    for gi, g in enumerate(groups):
        for n in g.get("param_names", []):
            group_of[n] = gi
    model = torch.jit.load(os.path.join(run, "model.pt")).double()
    params = dict(model.named_parameters())
    ce = manifest["loss"] == "ce"
    smoothing = float(manifest.get("label_smoothing", 0.0))
    def inputs(path):
        """Inputs as fed: float64 for the float64 model, int64 tokens as they are."""
        x = torch.from_numpy(np.load(path))
        return x.double() if x.is_floating_point() else x

    x_train = inputs(os.path.join(run, "data", "train_x.npy"))
    y_train = torch.from_numpy(np.load(os.path.join(run, "data", "train_y.npy")))

    def ckpt(k):
        return os.path.join(run, "checkpoints", "step_%08d" % k)

    def set_weights(k):
        sd = torch.load(ckpt(k) + ".pt")
        with torch.no_grad():
            for n, p in params.items():  # the frozen ones too: constants of the model
                p.copy_(sd[n].double())
            for n, b in model.named_buffers():  # BatchNorm's running statistics after k steps
                if b.is_floating_point():
                    b.copy_(sd[n].double())

    def flat_grad(scalar):
        gs = torch.autograd.grad(scalar, [params[n] for n in names], allow_unused=True, retain_graph=True)
        return torch.cat([(g if g is not None else torch.zeros_like(params[n])).reshape(-1) for g, n in zip(gs, names)])

    def loss_of(out, y):
        if ce:
            return torch.nn.functional.cross_entropy(out, y, label_smoothing=smoothing)
        return 0.5 * ((out - y.double()) ** 2).sum(1).mean()  # SPEC: |f - y|^2 / 2 per example

    def settings(k):
        """Each group's settings at step k: the manifest's, or the record's own."""
        rec = steps[k]
        out = []
        for gi, g in enumerate(groups):
            s = dict(g)
            if "groups" in rec:
                s.update(rec["groups"][gi])
            s["lr"] = rec["lrs"][gi] if "lrs" in rec else rec["lr"]
            out.append(s)
        return out

    def batch(k):
        rec = steps[k]
        idx = torch.tensor(rec["batch"])
        x = inputs(os.path.join(run, rec["inputs"])) if "inputs" in rec else x_train[idx]
        return idx, x, y_train[idx]

    n_steps = len(steps)
    sizes = [params[n].numel() for n in names]
    # Per step: the applied gradient at w_j (flat, float64), its per-example rows when explaining.
    probes = np.load(os.path.join(analysis, "arrays", "probe.npy"))
    a_summary = json.load(open(os.path.join(analysis, "summary.json")))
    split = a_summary["settings"]["split"]
    x_probe_all = inputs(os.path.join(run, "data", split + "_x.npy"))
    kopt_pk = np.load(os.path.join(analysis, "arrays", "Kopt.npy"))
    step_of = np.load(os.path.join(analysis, "arrays", "step.npy"))
    explained = None
    if explanation:
        e_summary = json.load(open(os.path.join(explanation, "summary.json")))
        explained = [(p["probe"], p["output"]) for p in e_summary["per_probe"]]
        e_split = e_summary["settings"]["split"]
        x_explained = inputs(os.path.join(run, "data", e_split + "_x.npy"))

    def scale_vector(st):
        return torch.cat([torch.full((sz,), st[group_of[n]]["lr"] / st[0]["lr"]) for n, sz in zip(names, sizes)])

    def slot(k, name):
        """A state slot after k steps, flattened in the optimizer's order (zeros before it exists)."""
        state = torch.load(ckpt(k) + ".optim.pt")["state"]
        # A parameter torch.optim never updated (no gradient: unused by the forward) has no state.
        return torch.cat([state[position[n]][name].double().reshape(-1)
                          if position[n] in state and name in state[position[n]] else torch.zeros(params[n].numel())
                          for n in names])

    def precond(k, st):
        """P_k from torch.optim's state files, as each optimizer divides by it."""
        g0 = st[0]
        if kind == "sgd":
            return torch.ones(sum(sizes))
        if kind in ("adam", "adamw"):
            return 1.0 / ((slot(k + 1, "exp_avg_sq") / (1 - g0["betas"][1] ** (k + 1))).sqrt() + g0["eps"])
        if kind == "rmsprop":
            v = slot(k + 1, "square_avg")
            if g0.get("centered"):
                v = v - slot(k + 1, "grad_avg") ** 2
            return 1.0 / (v.sqrt() + g0["eps"])
        if kind == "adagrad":
            return 1.0 / (slot(k + 1, "sum").sqrt() + g0["eps"])
        if kind == "adadelta":  # the accumulated update before step k, the squared gradient after it
            return (slot(k, "acc_delta") + g0["eps"]).sqrt() / (slot(k + 1, "square_avg") + g0["eps"]).sqrt()
        raise ValueError(kind)

    def coefficients(k):
        """c_{k,j} for j = 0..k, as explicit products of each step's own settings."""
        st_k = settings(k)[0]
        c = []
        for j in range(k + 1):
            st_j = settings(j)[0]
            if kind == "sgd":
                mu_k = st_k.get("momentum", 0)
                if mu_k == 0:
                    c.append(1.0 if j == k else 0.0)
                    continue
                s_j = 1.0 if j == 0 else 1 - st_j.get("dampening", 0)
                prod = 1.0
                for i in range(j + 1, k + 1):
                    prod *= settings(i)[0]["momentum"]
                alpha, nu = (mu_k, 1.0) if st_k.get("nesterov") else (1.0, 0.0)
                c.append(alpha * s_j * prod + (nu if j == k else 0.0))
            elif kind == "rmsprop":  # b_k = mu b_{k-1} + P_k gt_k: P_j stays with gradient j
                prod = 1.0
                for i in range(j + 1, k + 1):
                    prod *= settings(i)[0].get("momentum", 0)
                c.append(prod)
            elif kind == "adagrad":
                c.append(1.0 / (1 + k * st_k.get("lr_decay", 0)) if j == k else 0.0)
            elif kind == "adadelta":
                c.append(1.0 if j == k else 0.0)
            else:
                b1_k = st_k["betas"][0]
                prod = 1.0
                for i in range(j + 1, k + 1):
                    prod *= settings(i)[0]["betas"][0]
                c.append((1 - st_j["betas"][0]) * prod / (1 - b1_k ** (k + 1)))
        return c

    grads, rows, weights = [], [], []
    for j in range(n_steps):
        set_weights(j)
        weights.append(torch.cat([params[n].detach().reshape(-1) for n in names]))
        idx, x, y = batch(j)
        gs = steps[j].get("grad_scale", 1.0)
        # The batch as training computed it: a step's Dropout masks on its sites (then each example's
        # row is its loss's gradient through that one batch forward); the probes below predict.
        coupled = "masks" in steps[j] or bool(steps[j].get("batchnorm_train"))
        with training_forward(model, run, steps[j]):
            out_b = model(x)
            grads.append(gs * flat_grad(loss_of(out_b, y)))
            if explained is not None:
                rows.append((idx, torch.stack([gs / len(idx) * flat_grad(
                    loss_of(out_b[m:m + 1] if coupled else model(x[m:m + 1]), y[m:m + 1])) for m in range(len(idx))])))
    worst_k, scale_k = 0.0, 0.0
    attr = None
    if explained is not None:
        attr = torch.zeros(len(explained), x_train.shape[0])
    inner = kind == "rmsprop" and groups[0].get("momentum", 0) > 0  # P_j inside the buffer
    p_of = [precond(k, settings(k)) for k in range(n_steps)]
    tensor_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))

    def rounding_scale(j):
        """G_j + lambda_j W_j of each weight's tensor at step j (the decay of i's group)."""
        st = settings(j)
        g = torch.stack([t.abs().max() for t in grads[j].split(sizes)])[tensor_of]
        w = torch.stack([t.abs().max() for t in weights[j].split(sizes)])[tensor_of]
        decay = torch.cat([torch.full((sz,), float(st[group_of[n]].get("weight_decay", 0))) for n, sz in zip(names, sizes)])
        return g + decay * w

    scales = [rounding_scale(j) for j in range(n_steps)]
    bound = {}
    for k in range(n_steps):
        st = settings(k)
        lr = st[0]["lr"]
        r = scale_vector(st)
        q = [r * (p_of[j] if inner else p_of[k]) for j in range(k + 1)]  # the factor of gradient j at step k
        c = coefficients(k)
        direction = sum(c[j] * q[j] * grads[j] for j in range(k + 1))
        set_weights(k)
        if k in set(int(s) for s in step_of):
            row = int(np.nonzero(step_of == k)[0][0])
            out = model(x_probe_all[torch.tensor(probes)])
            dw = torch.cat([torch.load(ckpt(k + 1) + ".pt")[n].double().reshape(-1) for n in names]) - weights[k]
            b = EPS32 * (GRADIENT_ROUNDING * lr * r * sum(abs(c[j]) * q[j].abs() * scales[j] for j in range(k + 1))
                         + UPDATE_ROUNDING * (dw.abs() + weights[k].abs()))
            sq = 0.0
            for p in range(out.shape[0]):
                for o in range(out.shape[1]):
                    jrow = flat_grad(out[p, o])
                    mine = -lr * float(jrow @ direction)
                    worst_k = max(worst_k, abs(mine - kopt_pk[row, p, o]))
                    scale_k = max(scale_k, abs(mine))
                    sq += float(jrow.abs() @ b) ** 2
            bound[row] = sq ** 0.5
        if explained is not None:
            for p, (probe, logit) in enumerate(explained):
                g = flat_grad(model(x_explained[probe:probe + 1])[0, logit])
                for j in range(k + 1):
                    idx, rows_j = rows[j]
                    attr[p].index_add_(0, idx, -lr * c[j] * (rows_j @ (q[j] * g)))
    result = {"kopt_max_error": worst_k / max(scale_k, 1e-300), "kopt_scale": scale_k,
              "uopt_round_bound": [bound[i] for i in range(len(step_of))]}
    if explained is not None:
        theirs = torch.from_numpy(np.load(os.path.join(explanation, "attributions.npy")))
        result["attr_max_error"] = float((theirs - attr).abs().max() / attr.abs().max())
        result["attr_scale"] = float(attr.abs().max())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
