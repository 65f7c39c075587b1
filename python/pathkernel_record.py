"""Record a PyTorch training run in the format pathkernel analyzes.

    from pathkernel_record import Recorder, Tracked

    train_set = Tracked(train_set)            # remembers the indices the loader fetches
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    rec = Recorder("runs/mine", model, optimizer, train=train_set, test=test_set, loss="ce")
    for data, target in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        optimizer.step()
        rec.step(loss)
        scheduler.step()            # any scheduler: each step's rate and settings are recorded
    rec.close()

With worker processes (num_workers > 0), wrap the set in Indexed instead: its items carry their
index (`for data, target, idx in loader`, `rec.step(idx, loss)`).

train and test may also be tensors (X, y); the loop then indexes them itself, X[idx].

The run directory (docs/run-format.md) holds the model as TorchScript, the data exactly as fed
to the model (.npy), one record per step (rate, batch indices, loss), and state_dict
checkpoints of the weights and the optimizer. Needs only torch and numpy. A run killed mid-way
stays readable up to its last complete step.
"""
import contextlib
import copy
import json
import math
import types
import os
import time
import warnings

import numpy as np
import torch

FORMAT = "pathkernel-recorded-run/1"
_OPTIMIZERS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw",
               torch.optim.RMSprop: "rmsprop", torch.optim.Adagrad: "adagrad", torch.optim.Adadelta: "adadelta"}
# The settings of a parameter group that enter the update besides the rate. A scheduler may change
# them between steps (OneCycleLR's momentum or beta1): each step records them when they differ
# from the manifest's. Parameter groups may differ in their rate and weight decay.
_GROUP_KEYS = ("momentum", "dampening", "nesterov", "betas", "eps", "alpha", "centered", "rho", "lr_decay",
               "initial_accumulator_value")
_UPDATE_KEYS = _GROUP_KEYS + ("weight_decay",)


def _update_settings(group):
    """A parameter group's update settings as JSON values (betas as a list)."""
    return json.loads(json.dumps({k: group[k] for k in _UPDATE_KEYS if k in group}))


def _group_mismatch(groups):
    """The settings (other than lr and weight_decay) in which parameter groups differ."""
    return sorted({k for g in groups[1:] for k in _GROUP_KEYS if g.get(k) != groups[0].get(k)})

# The gradient fingerprint (docs/run-format.md): the norm of the gradient the optimizer applied
# at each step and its products with a few fixed +-1 vectors. pathkernel recomputes both from
# the stored weights, batch and data, so a step whose gradient was not the one the analysis sees
# (a module's mode switched, augmented inputs, clipping) is caught.
FINGERPRINT_SEED = 0x7061746B  # "patk"
FINGERPRINT_PROJECTIONS = 4
_SIGN_CHUNK = 1 << 16  # parameters per chunk of the fingerprint's products (2 MiB of float64 signs: cache-sized)


def _splitmix64(x):
    """splitmix64 of a uint64 array, wrapping like C's uint64_t."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def fingerprint_signs(seed, j, n):
    """Vector j of the fingerprint: float64 [n], element i is +1 when the top bit of
    splitmix64(seed + j * 2**40 + i) is set, else -1 (i counts over every trained parameter,
    flattened, in the manifest's model.parameters order)."""
    base = np.uint64(seed) + np.uint64(j) * np.uint64(1 << 40)
    z = _splitmix64(base + np.arange(n, dtype=np.uint64))
    return np.where((z >> np.uint64(63)) == np.uint64(1), 1.0, -1.0)


def _atomic(path, write):
    """Writes path through write(tmp_path) and a rename: never a torn file."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _first_line(error):
    """An exception's message, its first line only (TorchScript's run to many lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _save_npy(path, array):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    _atomic(path, write)


def _to_cpu(obj):
    """A state dict with every tensor on the CPU (pathkernel reads CPU storages), structure kept."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, _to_cpu(v)) for k, v in obj.items()) if not hasattr(obj, "_metadata") else \
            _with_metadata(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _with_metadata(sd):
    out = type(sd)((k, _to_cpu(v)) for k, v in sd.items())
    out._metadata = sd._metadata
    return out


def _check_model(model, mask_sites=(), norm_sites=()):
    """Refuses a module mode the run cannot record: BatchNorm in training mode other than a
    recorded site (norm_sites: the model is scripted, the module keeps running statistics), and
    Dropout in training mode other than an nn.Dropout whose masks the recorder keeps (mask_sites)."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and name not in norm_sites:
            if not m.track_running_stats:
                raise ValueError(
                    "module '%s' is BatchNorm without running statistics (track_running_stats=False): its "
                    "predictions depend on the batch they are made in. Use track_running_stats=True, GroupNorm or "
                    "LayerNorm." % name)
            raise ValueError(
                "module '%s' is BatchNorm in training mode: its batch statistics are recorded for a model that "
                "TorchScript can script (torch.jit.script), not a traced one. Put it in eval mode (frozen "
                "statistics), or make the model scriptable." % name)
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training and m.p > 0 and name not in mask_sites:
            if type(m) is not torch.nn.Dropout:
                raise ValueError(
                    "module '%s' is %s in training mode: the recorder keeps the masks of nn.Dropout only. Record "
                    "with it off (p=0 or eval mode)." % (name, type(m).__name__))
            if m.p >= 1:
                raise ValueError("module '%s' is Dropout with p=%g in training mode: it drops every input" % (name, m.p))
            raise ValueError(
                "module '%s' is Dropout in training mode, which it was not when the Recorder was created: its "
                "masks are kept only for a model recorded with its Dropout in training mode (a model whose "
                "Dropout is off when the Recorder is created is matched to pathkernel's own layers). Create the "
                "Recorder after model.train()." % name)


class _StepMaskDropout(torch.nn.Module):
    """nn.Dropout as the recorded model.pt holds it: in training mode the input times the step's
    mask (0 or 1, over 1 - p), which pathkernel sets before each training forward of a step from
    the masks the recorder kept; in eval mode the identity."""

    def __init__(self, p):
        super().__init__()
        self.pathkernel_dropout_p = float(p)
        self.mask = torch.zeros(0)

    def forward(self, x):
        if self.training:
            return x * self.mask
        return x


def read_step_masks(run, record):
    """A recorded step's Dropout masks as {site name: bool tensor [batch, ...]} ({} when it has
    none), from the record (a line of steps.jsonl) and its masks file in the run folder `run`."""
    if "masks" not in record:
        return {}
    manifest = json.load(open(os.path.join(run, "manifest.json")))
    names = [site["module"] for site in manifest["dropout"]["sites"] if site["module"] in record["mask_shapes"]]
    shapes = [record["mask_shapes"][n] for n in names]
    total = sum(int(np.prod(shape)) for shape in shapes)
    bits = np.unpackbits(np.load(os.path.join(run, record["masks"])))
    if bits.shape[0] != (total + 7) // 8 * 8 or bits[total:].any():
        raise ValueError("%s: not the packed bits of masks %s" % (record["masks"], shapes))
    out, at = {}, 0
    for n, shape in zip(names, shapes):
        size = int(np.prod(shape))
        out[n] = torch.from_numpy(bits[at:at + size].reshape(shape).astype(bool))
        at += size
    return out


def set_step_masks(scripted, masks, p):
    """Makes the recorded TorchScript model's Dropout sites train with `masks` (read_step_masks;
    p: {site: p}, the manifest's), or, with masks {}, predict (every site off)."""
    dtype = next(scripted.parameters()).dtype
    for name, module in scripted.named_modules():
        if name in p:
            on = name in masks
            module.mask = masks[name].to(dtype) / (1 - p[name]) if on else torch.zeros(0, dtype=dtype)
            module.train(on)


def _norm_sites(model):
    """The BatchNorm modules with running statistics, by name: in training mode a step normalizes
    its batch by the batch's own statistics; predictions use the running ones."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def training_forward(scripted, run, record):
    """The recorded model (`scripted`, loaded from the run's model.pt) as step `record` (a line of
    steps.jsonl) trained, inside the with-block: its Dropout sites with the step's masks, the
    BatchNorm modules the record lists in training mode (their running statistics restored on
    leaving); predictions again afterwards."""
    manifest = json.load(open(os.path.join(run, "manifest.json")))
    p = {site["module"]: site["p"] for site in manifest.get("dropout", {}).get("sites", [])}
    modules = dict(scripted.named_modules())
    norms = record.get("batchnorm_train", [])
    saved = {n: [getattr(modules[n], b).clone() for b in _NORM_BUFFERS] for n in norms}
    set_step_masks(scripted, read_step_masks(run, record), p)
    for n in norms:
        modules[n].train(True)
    try:
        yield scripted
    finally:
        set_step_masks(scripted, {}, p)
        with torch.no_grad():
            for n in norms:
                modules[n].train(False)
                for b, value in zip(_NORM_BUFFERS, saved[n]):
                    getattr(modules[n], b).copy_(value)


_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _dropout_sites(model):
    """The nn.Dropout modules whose masks a run can record (p in (0, 1)), by name."""
    return [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Dropout and 0 < m.p < 1]


def _with_mask_sites(model, names, norms=()):
    """A copy of model with each named nn.Dropout replaced by a _StepMaskDropout and the named
    BatchNorm modules in eval mode (for scripting: pathkernel switches them on for a step's batch)."""
    if not names and not norms:
        return model
    out = copy.deepcopy(model)
    for name in norms:
        out.get_submodule(name).train(False)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        holder = out.get_submodule(parent) if parent else out
        site = _StepMaskDropout(holder.get_submodule(leaf).p)
        site.train(False)
        setattr(holder, leaf, site)
    return out


class _MaskKeeper:
    """The masks of nn.Dropout in training mode, per training forward: each site's mask is drawn
    again from the generator state its forward started from (the draws F.dropout makes on the
    CPU) and checked to give the site's output bit for bit."""

    def __init__(self, model, called, sites, norms=()):
        self.names = {id(m): n for n, m in list(sites) + list(norms)}
        self.forward = None   # the masks of the running training forward, by site name (BatchNorm: None)
        self._pending = {}
        self._hooks = []
        if not sites and not norms:
            return

        def top(module, args):
            if torch.is_grad_enabled():
                self.forward = {}
        self._hooks.append(called.register_forward_pre_hook(top))
        for _, m in sites:
            self._hooks.append(m.register_forward_pre_hook(self._before))
            self._hooks.append(m.register_forward_hook(self._after))
        for _, m in norms:
            self._hooks.append(m.register_forward_pre_hook(self._norm))

    def _norm(self, module, args):
        if module.training and torch.is_grad_enabled() and self.forward is not None:
            self.forward[self.names[id(module)]] = None

    def _before(self, module, args):
        if not (module.training and torch.is_grad_enabled() and self.forward is not None):
            return
        x = args[0]
        if x.device.type != "cpu":
            raise ValueError("module '%s' is Dropout in training mode on %s: its masks are recorded on the CPU only"
                             % (self.names[id(module)], x.device))
        self._pending[id(module)] = (torch.get_rng_state(), x.detach().clone() if module.inplace else x.detach())

    def _after(self, module, args, output):
        pending = self._pending.pop(id(module), None)
        if pending is None:
            return
        name, (state, x) = self.names[id(module)], pending
        if name in self.forward:
            raise ValueError("module '%s' (Dropout) ran twice in one forward: give each place its own nn.Dropout" % name)
        now = torch.get_rng_state()
        torch.set_rng_state(state)
        try:
            noise = torch.empty_like(x, memory_format=torch.contiguous_format).bernoulli_(1 - module.p)
        finally:
            torch.set_rng_state(now)
        if not torch.equal(x * noise.div(1 - module.p), output.detach()):
            raise ValueError("module '%s': its Dropout mask could not be reproduced from the generator state (this "
                             "torch build draws it otherwise)" % name)
        self.forward[name] = noise.to(torch.bool)

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _is_flatten(m):
    return isinstance(m, torch.nn.Flatten) and m.start_dim == 1 and m.end_dim == -1


def _without_identities(mods):
    """The chain without the modules that are identities in a recorded run: nn.Identity, Dropout
    of any kind (recorded only in eval mode or with p = 0: _check_model refuses it otherwise, at
    every step) and a Flatten of what is already flat (after a Linear or another Flatten)."""
    out, flat = [], False
    for name, m in mods:
        if isinstance(m, (torch.nn.Identity, torch.nn.modules.dropout._DropoutNd)):
            continue
        if _is_flatten(m):
            if flat:
                continue
            flat = True
        elif isinstance(m, torch.nn.Linear):
            flat = True
        out.append((name, m))
    return out


def _mlp_spec(mods):
    """[Flatten,] Linear, act, ..., Linear (one activation kind): ("mlp:W..:act" or "linear", names)."""
    acts = {torch.nn.Tanh: "tanh", torch.nn.ReLU: "relu"}
    if mods and _is_flatten(mods[0][1]):
        mods = mods[1:]
    if not mods or len(mods) % 2 == 0:
        return None
    linears, act = [], None
    for i, (name, m) in enumerate(mods):
        if i % 2 == 0:
            if type(m) is not torch.nn.Linear or m.bias is None:
                return None
            linears.append((name, m))
        else:
            kind = acts.get(type(m))
            if kind is None or (act is not None and kind != act):
                return None
            act = kind
    widths = [m.out_features for _, m in linears[:-1]]
    spec = "linear" if not widths else "mlp:%s:%s" % (",".join(map(str, widths)), act)
    names = {}
    for i, (n, _) in enumerate(linears):
        names["%s.weight" % n] = "layers.%d.weight" % i
        names["%s.bias" % n] = "layers.%d.bias" % i
    return spec, names


def _cnn_spec(mods, input_shape):
    """The zoo's cnn:C1,C2:act: [Conv2d 3x3 pad 1, act, MaxPool2d(2)] x 2, Flatten, Linear."""
    acts = {torch.nn.Tanh: "tanh", torch.nn.ReLU: "relu"}
    if len(mods) != 8 or input_shape is None or len(input_shape) != 3:
        return None
    kinds = [type(m) for _, m in mods]
    if kinds[2] is not torch.nn.MaxPool2d or kinds[5] is not torch.nn.MaxPool2d or not _is_flatten(mods[6][1]):
        return None
    act = acts.get(kinds[1])
    if act is None or acts.get(kinds[4]) != act or type(mods[7][1]) is not torch.nn.Linear:
        return None
    convs = [mods[0][1], mods[3][1]]
    channels = input_shape[0]
    for c in convs:
        if (type(c) is not torch.nn.Conv2d or c.bias is None or c.in_channels != channels
                or tuple(c.kernel_size) != (3, 3) or tuple(c.stride) != (1, 1) or tuple(c.padding) != (1, 1)
                or tuple(c.dilation) != (1, 1) or c.groups != 1 or c.padding_mode != "zeros"):
            return None
        channels = c.out_channels
    for _, p in (mods[2], mods[5]):
        k = p.kernel_size if isinstance(p.kernel_size, int) else tuple(p.kernel_size)
        s = p.stride if isinstance(p.stride, int) else tuple(p.stride)
        if k not in (2, (2, 2)) or s not in (2, (2, 2)) or p.padding not in (0, (0, 0)) \
                or p.dilation not in (1, (1, 1)) or p.ceil_mode or p.return_indices:
            return None
    fc = mods[7][1]
    if fc.bias is None or fc.in_features != channels * (input_shape[1] // 4) * (input_shape[2] // 4):
        return None
    names = {}
    for (n, _), zoo in zip((mods[0], mods[3], mods[7]), ("convs.0", "convs.1", "fc")):
        names["%s.weight" % n] = zoo + ".weight"
        names["%s.bias" % n] = zoo + ".bias"
    return "cnn:%d,%d:%s" % (convs[0].out_channels, convs[1].out_channels, act), names


def zoo_spec(model, input_shape=None):
    """pathkernel's name for `model` when it is an nn.Sequential chain the analyzer knows, as
    (spec, {recorded parameter name: pathkernel's name}); None otherwise. Known chains:
    [Flatten,] Linear, act, ..., Linear with one activation kind (tanh or relu): "mlp:W1,..:act"
    or "linear"; and, for inputs of `input_shape` (C, H, W), the zoo's small CNN: Conv2d 3x3
    (padding 1), act, MaxPool2d(2), Conv2d 3x3 (padding 1), act, MaxPool2d(2), Flatten, Linear:
    "cnn:C1,C2:act". Identities (nn.Identity, Dropout, which is recorded only when it is off, and
    a Flatten of flat features) are left out of the match; the parameter names still come from
    the modules' own. The analyzer then uses its fast factorized kernels for it; any other model
    is analyzed through its TorchScript form by autograd."""
    if not isinstance(model, torch.nn.Sequential):
        return None
    # Each layer's weight must be its own parameter, used as it is: no hook computing it
    # (torch.nn.utils.weight_norm's weight_g and weight_v), no parametrization.
    if any(m._forward_pre_hooks or m._forward_hooks or getattr(m, "parametrizations", None)
           for m in model.modules()):
        return None
    mods = _without_identities(list(model.named_children()))
    known = _mlp_spec(mods) or _cnn_spec(mods, None if input_shape is None else tuple(input_shape))
    if known is None or set(known[1]) != {n for n, _ in model.named_parameters()}:
        return None
    return known


class Indexed(torch.utils.data.Dataset):
    """A dataset whose items carry their index, so that a DataLoader loop knows its batches:

        loader = DataLoader(Indexed(train_set), batch_size=64, shuffle=True)
        for data, target, idx in loader:
            ...
            rec.step(idx, loss)
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i][:2]
        return x, y, i


class Tracked(torch.utils.data.Dataset):
    """The dataset as it is, which remembers the indices a DataLoader fetches from it, so that
    the loop stays as written and rec.step(loss) knows the batch:

        train_set = Tracked(train_set)
        loader = DataLoader(train_set, batch_size=64, shuffle=True)
        rec = Recorder("runs/mine", model, optimizer, train=train_set)
        for data, target in loader:
            ...
            optimizer.step()
            rec.step(loss)

    The loader must fetch in this process (num_workers=0, the default); with worker processes
    use Indexed and rec.step(idx, loss).
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.fetched = []
        self.tracking = True

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if self.tracking:
            self.fetched.append(int(i))
        return self.dataset[i]


def _as_pair(data, name):
    """(inputs, targets) from a pair of tensors, or a map-style Dataset of (input, target) items
    (an Indexed or Tracked one too), stacked in index order as the dataset gives them."""
    if isinstance(data, (Indexed, Tracked)):
        data = data.dataset
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        items = [data[i] for i in range(len(data))]
        if not items:
            raise ValueError("%s: the dataset is empty" % name)
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.stack([torch.as_tensor(it[1]) for it in items])
        return x, y
    raise ValueError("%s must be (inputs, targets) or a map-style Dataset of (input, target) items" % name)


def _join(used):
    """Gradient accumulation: several training forwards of one step (their outputs reached by the
    backward passes) whose inputs and outputs join along the batch. The step is then their rows
    together, its loss the batch's, computed from their outputs (the loop's is one micro-batch's).
    False when they do not join (then the last forward is the step's, as without)."""
    if len(used) < 2:
        return False
    try:
        torch.cat([f["y"][:0].cpu() for f in used])
        torch.cat([f["x"].detach()[:0].cpu() for f in used])
    except RuntimeError:
        return False
    return True


def _autocast_dtype():
    """The dtype torch.autocast computes in here ("bfloat16", "float16"), or None outside it."""
    if torch.is_autocast_cpu_enabled():
        return str(torch.get_autocast_cpu_dtype()).replace("torch.", "")
    if torch.is_autocast_enabled():
        return str(torch.get_autocast_gpu_dtype()).replace("torch.", "")
    return None


class _Selected(torch.nn.Module):
    """The model with the one output the analysis reads: forward returns model(x)[key]."""

    def __init__(self, model, key):
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x):
        return self.model(x)[self.key]


class Recorder:
    """Writes a recorded run to `out` (created; must not exist or be empty).

    model: an nn.Module mapping a batch of inputs [M, ...] to logits [M, C] (or outputs for
        MSE). Saved as TorchScript: scripted, or traced from the first training input when
        scripting fails (or always, with script=False).
    optimizer: torch.optim.SGD (momentum, Nesterov, dampening, weight decay), Adam, AdamW,
        RMSprop (momentum, centered), Adagrad or Adadelta over the model's parameters. Parameter
        groups may have their own learning rate and weight decay; a scheduler may change the rate,
        momentum, betas and weight decay at every step. Parameters it does not train (frozen with
        requires_grad=False, or not given to it) are constants of the model: the kernel is over
        the trained ones, and a step after which a constant changed is refused.
    train, test: (inputs, targets) exactly as fed to the model: float32 inputs of any shape
        [N, ...] (or int64 tokens [N, ...] for a model that embeds them, nn.Embedding); int64
        class labels [N] for loss "ce", float32 targets [N, C] for loss "mse".
        Or a map-style Dataset of (input, target) items (torchvision's, with its transforms),
        read once in index order; wrap the training set in Indexed for the DataLoader.
    loss: "ce" (mean cross-entropy over the batch) or "mse" (mean over the batch of the summed
        squared error per example, as pathkernel train defines it).
    label_smoothing: for loss "ce", the epsilon in [0, 1) of the loop's
        nn.CrossEntropyLoss(label_smoothing=epsilon) or F.cross_entropy(..., label_smoothing=...):
        each example's loss is then (1 - epsilon) times its cross-entropy plus epsilon times the
        mean over the classes of -log softmax.
    checkpoint_every: 1 saves the weights after every step (every step can be analyzed); K > 1
        saves the weights before and after every K-th step (steps 0, K, 2K, ... can be analyzed).
    output: for a model whose forward returns a tuple, list or dict, the index or key of the
        output the loss is computed from (the run then records the model with that output, its
        parameters named model.<name>).
    classes: the class names, one per output (reports and grids show them); by default the
        training set's own `classes` attribute when it has one (torchvision's datasets do).
    capture_inputs: the inputs of the step's training forward (the one its backward reached) are
        compared with the stored rows of the batch; when they differ (augmentation), they are
        stored with the step, so the analysis sees what training saw. rec.step(..., inputs=x)
        gives them explicitly. With gradient accumulation (several forwards and backward passes,
        one optimizer.step()), the forwards a backward pass reached are joined into the step's
        batch, and its loss is computed from their outputs (recorded as `accumulated`).
    """

    def __init__(self, out, model, optimizer, train, test=None, loss="ce", checkpoint_every=1,
                 script=True, capture_inputs=True, output=None, classes=None, label_smoothing=0.0):
        # Everything is checked before anything is written: a refused Recorder leaves no files.
        if loss not in ("ce", "mse"):
            raise ValueError("loss must be 'ce' or 'mse', not %r" % (loss,))
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
                or not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError("label_smoothing must be a number in [0, 1), not %r" % (label_smoothing,))
        if loss != "ce" and label_smoothing != 0:
            raise ValueError("label_smoothing is for loss 'ce' (cross-entropy), not %r" % (loss,))
        self._smoothing = float(label_smoothing)
        if int(checkpoint_every) < 1:
            raise ValueError("checkpoint_every must be at least 1")
        kind = _OPTIMIZERS.get(type(optimizer))
        if kind is None:
            raise ValueError("optimizer %s is not supported (SGD, Adam, AdamW, RMSprop, Adagrad, Adadelta)"
                             % type(optimizer).__name__)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        if _group_mismatch(groups):
            raise ValueError("parameter groups with different %s are not supported: groups may differ in their "
                             "learning rate and weight decay" % ", ".join(_group_mismatch(groups)))
        for g in groups:
            for flag in ("maximize", "amsgrad"):
                if g.get(flag):
                    raise ValueError("%s=True is not supported" % flag)
        memory = kind != "sgd" or groups[0].get("momentum", 0) != 0
        if int(checkpoint_every) > 1 and memory:
            raise ValueError("checkpoint_every=%d with %s: the analyzer needs the optimizer state at every step "
                             "(it does not replay the optimizer between stored states); use checkpoint_every=1"
                             % (int(checkpoint_every), "momentum" if kind == "sgd" else kind))
        _check_model(model, [n for n, m in _dropout_sites(model) if m.training], [n for n, _ in _norm_sites(model)])
        if output is not None:  # recorded as a module whose forward gives the named output
            model = _Selected(model, output)
            script = False
        sites = _dropout_sites(model)
        dropout_on = [n for n, m in sites if m.training]
        norms = _norm_sites(model)
        norm_on = [n for n, m in norms if m.training]
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise FileExistsError("%s exists and is not an empty folder: pathkernel never overwrites a run" % out)
        names = {id(p): n for n, p in model.named_parameters()}
        order = [p for g in optimizer.param_groups for p in g["params"]]
        if any(id(p) not in names for p in order):
            raise ValueError("the optimizer holds tensors that are not parameters of the model")
        # Parameters the run does not train (a frozen backbone: requires_grad=False, or left out
        # of the optimizer) are constants of the model; the kernel is over the trained ones.
        trained_ids = {id(p) for p in order if p.requires_grad}
        if not trained_ids:
            raise ValueError("the optimizer trains no parameter: every one it holds has requires_grad=False")
        constants = [(n, p) for n, p in model.named_parameters() if id(p) not in trained_ids]
        sparse = [n for n, m in model.named_modules()
                  if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse]
        if sparse:
            raise ValueError("module '%s' has sparse=True (sparse gradients): pathkernel computes dense gradients; "
                             "train with sparse=False" % sparse[0])
        splits = {}
        for split, pair in (("train", train), ("test", test)):
            if pair is None:
                continue
            x, y = (torch.as_tensor(t).detach().cpu() for t in _as_pair(pair, split))
            if x.dtype not in (torch.float32, torch.int64):
                raise ValueError("%s inputs must be float32 (or int64 tokens), not %s" % (split, x.dtype))
            if split == "test" and "train" in splits and x.dtype != splits["train"][0].dtype:
                raise ValueError("test inputs are %s, the training inputs %s" % (x.dtype, splits["train"][0].dtype))
            want = torch.int64 if loss == "ce" else torch.float32
            if y.dtype != want:
                raise ValueError("%s targets must be %s for loss %s, not %s" % (split, want, loss, y.dtype))
            if x.shape[0] != y.shape[0] or x.shape[0] == 0:
                raise ValueError("%s: %d inputs, %d targets" % (split, x.shape[0], y.shape[0]))
            splits[split] = (x, y)
        if "train" not in splits:
            raise ValueError("train=(inputs, targets) is required")
        # The model on the CPU, as pathkernel reads it (a model trained on a GPU records the same).
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        example = splits["train"][0][:1].to(device)
        # Each nn.Dropout becomes a site whose masks pathkernel sets (_StepMaskDropout), unless the
        # model is one of pathkernel's own (its Dropout off) or must be traced (a trace keeps one mode).
        known = None if dropout_on or norms or constants else zoo_spec(model, splits["train"][0].shape[1:])
        mask_sites = [] if known is not None else [n for n, _ in sites]
        norm_sites = [n for n, _ in norms]
        scripted = None
        why_not_script = "script=False"
        if script:
            try:
                scripted = torch.jit.script(_with_mask_sites(model, mask_sites, norm_sites))
            except Exception as e:  # not scriptable: trace instead
                scripted = None
                why_not_script = _first_line(e)
        how = "script"
        if scripted is None:
            if dropout_on:
                raise ValueError("module '%s' is Dropout in training mode: its masks are recorded for a model that "
                                 "TorchScript can script (torch.jit.script), not a traced one" % dropout_on[0])
            if norm_on:
                _check_model(model, mask_sites)  # BatchNorm in training mode: refused, naming it
            mask_sites, norm_sites = [], []
            try:
                scripted = torch.jit.trace(model, example)
            except Exception as e:
                raise ValueError("the model could not be made TorchScript, which pathkernel analyzes: torch.jit.script "
                                 "refused it (%s) and torch.jit.trace failed on a training example (%s: %s); "
                                 "torch.utils.checkpoint(use_reentrant=True), for one, does not trace: use "
                                 "use_reentrant=False, or no checkpointing while recording"
                                 % (why_not_script, type(e).__name__, _first_line(e))) from e
            how = "trace"
        with torch.no_grad():
            outputs = scripted(example)
        if not isinstance(outputs, torch.Tensor):
            raise ValueError("the model returns a %s; pathkernel needs one tensor [batch, outputs]: name the one "
                             "the loss is computed from with Recorder(..., output=INDEX or KEY)" % type(outputs).__name__)
        if outputs.dim() != 2:
            raise ValueError("the model maps a batch to %d-d outputs; pathkernel needs [batch, outputs]" % outputs.dim())
        if classes is None:  # the dataset's own names (torchvision's datasets have them)
            base = train.dataset if isinstance(train, (Indexed, Tracked)) else train
            classes = getattr(base, "classes", None)
        if classes is not None:
            classes = [str(c) for c in classes]
            if len(classes) != int(outputs.shape[1]) or not all(classes) or max(len(c) for c in classes) > 200:
                raise ValueError("classes must name each of the model's %d outputs (non-empty, at most 200 "
                                 "characters), got %d names" % (int(outputs.shape[1]), len(classes)))
        self._classes = classes
        self._known = known
        self._mask_sites = mask_sites
        self._norm_sites = norm_sites
        self._site_p = {n: float(m.p) for n, m in sites if n in mask_sites}

        self.out, self.model, self.optimizer = out, model, optimizer
        self.every = int(checkpoint_every)
        self.k = 0
        self.closed = False
        self.param_names = [names[id(p)] for p in order]
        self._frozen = [names[id(p)] for p in order if id(p) not in trained_ids]
        # Each constant's value now: a step after which one differs (a second optimizer, an edit
        # outside optimizer.step()) or is trained (progressive unfreezing) is refused.
        self._constants = [(n, p, p.detach().clone()) for n, p in constants]
        # The model's other buffers (not BatchNorm's running statistics, which checkpoints hold for
        # each step) must stay as model.pt has them.
        running = {"%s.%s" % (n, b) if n else b for n, _ in _norm_sites(model)
                   for b in ("running_mean", "running_var", "num_batches_tracked")}
        self._buffers = [(n, b, b.detach().clone()) for n, b in model.named_buffers() if n not in running]
        self._members, at = [], 0  # each group's parameters, as indices into param_names
        for g in optimizer.param_groups:
            self._members.append(list(range(at, at + len(g["params"]))))
            at += len(g["params"])
        self.n_train = int(splits["train"][0].shape[0])
        self._order = order
        self._groups = groups
        self._manifest_settings = [_update_settings(g) for g in groups]
        self._loss = loss
        numel = sum(p.numel() for p in order)
        # The fingerprint's +-1 vectors as int8 (4 bytes a parameter for the four, not 32 in
        # float64), made one at a time; _project converts them a chunk at a time.
        self._signs = torch.empty(FINGERPRINT_PROJECTIONS, numel, dtype=torch.int8)
        for j in range(FINGERPRINT_PROJECTIONS):
            self._signs[j] = torch.from_numpy(fingerprint_signs(FINGERPRINT_SEED, j, numel))
        self._sign_chunk = torch.empty(FINGERPRINT_PROJECTIONS, min(numel, _SIGN_CHUNK), dtype=torch.float64)
        created = not os.path.exists(out)
        try:
            self._write_run(splits, scripted, how, int(outputs.shape[1]), kind, groups, loss)
        except BaseException:
            # Nothing half-made is left: the files this Recorder wrote go, and the folder if it made it.
            for sub in ("data", "checkpoints"):
                path = os.path.join(out, sub)
                if os.path.isdir(path):
                    for f in os.listdir(path):
                        os.remove(os.path.join(path, f))
                    os.rmdir(path)
            for f in ("model.pt", "manifest.json"):
                if os.path.exists(os.path.join(out, f)):
                    os.remove(os.path.join(out, f))
            if created and os.path.isdir(out) and not os.listdir(out):
                os.rmdir(out)
            raise
        # The rate each step used, taken when optimizer.step() runs (before any scheduler moves it).
        self._rates = None
        self._calls = 0  # optimizer.step() calls since the last rec.step
        original = optimizer.step

        def step(opt, closure=None):
            self._calls += 1
            loss = None
            if closure is not None:
                # optimizer.step(closure): torch.optim's SGD and Adam family call it once, first,
                # with gradients on; called here, so that what is recorded is what it computed.
                with torch.enable_grad():
                    loss = closure()
            self._rates = [float(g["lr"]) for g in opt.param_groups]
            self._settings = [_update_settings(g) for g in opt.param_groups]
            self._fingerprint = self._gradient_fingerprint()
            self._leftover_at_step, self._leftover = self._leftover, None
            self._fed_at_step, self._fed = self._fed, None
            self._masks_at_step, self._masks.forward = self._masks.forward, None
            # The training forwards whose outputs the backward passes went through: more than one
            # is gradient accumulation (micro-batches, one optimizer.step()).
            self._used_at_step, self._forwards = [f for f in self._forwards if f["used"]], []
            original()
            return loss
        if hasattr(original, "_with_counter"):  # an LR scheduler already counts the steps
            step._with_counter = original._with_counter
        # A bound method, as torch.optim's own: a scheduler made after the Recorder wraps it again.
        optimizer.step = types.MethodType(step, optimizer)
        self._log = open(os.path.join(out, "steps.jsonl"), "a")
        # The inputs of the training forwards (with gradients on), the last of them taken when
        # optimizer.step() runs: what the step was computed on. Registered after scripting.
        self._train_x = splits["train"][0]
        self._tracked = train if isinstance(train, Tracked) else None
        if self._tracked is not None:
            self._tracked.fetched = []  # the recorder's own reading of the data is no batch
        self._fed = self._fed_at_step = None
        # The raw gradient of each parameter, as backward() computes it (tensor hooks, summed over
        # the backward passes of a step): a uniform factor between it and the gradient applied
        # (clip_grad_norm_) is recorded as the step's grad_scale.
        # Each is held in a buffer of the recorder's own, made once (a fresh copy every step costs
        # more than the copy itself: bench/bench_recorder.py).
        self._raw = [None] * len(order)
        self._raw_buffers = [None] * len(order)
        self._flat = [None, None]  # float64 buffers [numel] for the fingerprint, each made once when needed

        self._leftover = self._leftover_at_step = None

        def raw_hook(i):
            p = order[i]

            def hook(g):
                if self._raw[i] is None:
                    # The step's first backward through p: .grad must not hold an earlier one's.
                    if self._leftover is None and p.grad is not None and bool(p.grad.any()):
                        self._leftover = self.param_names[i]
                    buf = self._raw_buffers[i]
                    if buf is None or buf.shape != g.shape or buf.dtype != g.dtype or buf.device != g.device:
                        buf = self._raw_buffers[i] = torch.empty_like(g, memory_format=torch.contiguous_format)
                    self._raw[i] = buf.copy_(g.detach())
                else:
                    self._raw[i].add_(g.detach())
            return hook
        self._grad_hooks = [p.register_hook(raw_hook(i)) for i, p in enumerate(order) if p.requires_grad]
        self._hook = self._post_hook = None
        self._forwards, self._used_at_step = [], []
        self._warned_autocast = False
        self._train_y = splits["train"][1]
        if capture_inputs:
            def pre_hook(module, args):
                if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
                    self._fed = args[0]

            def post_hook(module, args, output):
                # Each training forward's inputs, outputs and masks; marked used when a backward
                # pass reaches its output.
                if not (torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor)):
                    return
                out = output[model.key] if isinstance(model, _Selected) else output
                if not isinstance(out, torch.Tensor) or not out.requires_grad:
                    return
                entry = {"x": args[0], "y": out.detach(), "masks": self._masks.forward, "used": False,
                         "autocast": _autocast_dtype()}

                def reached(g):
                    entry["used"] = True
                out.register_hook(reached)
                self._forwards = self._forwards[-63:] + [entry]  # at most 64 between two steps
            # On the module the loop calls (inside the output selection, when there is one).
            called = model.model if isinstance(model, _Selected) else model
            self._hook = called.register_forward_pre_hook(pre_hook)
            self._post_hook = called.register_forward_hook(post_hook)
        self._masks = _MaskKeeper(model, model.model if isinstance(model, _Selected) else model,
                                  [(n, m) for n, m in sites if n in mask_sites],
                                  [(n, m) for n, m in norms if n in norm_sites])
        self._masks_at_step = None

    def _write_run(self, splits, scripted, how, outputs, kind, groups, loss):
        out = self.out
        os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
        os.makedirs(os.path.join(out, "data"), exist_ok=True)
        data = {}
        for split, (x, y) in splits.items():
            _save_npy(os.path.join(out, "data", split + "_x.npy"), x.contiguous().numpy())
            _save_npy(os.path.join(out, "data", split + "_y.npy"), y.contiguous().numpy())
            data[split] = {"x": "data/%s_x.npy" % split, "y": "data/%s_y.npy" % split,
                           "examples": int(x.shape[0]), "input_shape": list(x.shape[1:])}
        on_cpu = all(p.device.type == "cpu" for p in self.model.parameters())
        cpu = scripted if on_cpu else copy.deepcopy(scripted).cpu()
        _atomic(os.path.join(out, "model.pt"), lambda tmp: torch.jit.save(cpu, tmp))
        manifest = {
            "format": FORMAT,
            "created_by": "pathkernel_record.py",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch_version": torch.__version__,
            "model": {"file": "model.pt", "torchscript": how, "outputs": outputs,
                      "parameters": [[n, list(dict(self.model.named_parameters())[n].shape)] for n in self.param_names],
                      "state_dict_keys": list(self.model.state_dict().keys()),
                      "frozen": self._frozen},
            "loss": loss,
            "label_smoothing": self._smoothing,
            "optimizer": {"name": kind, "param_groups": [
                dict(g, param_names=[self.param_names[i] for i in members]) for g, members in zip(groups, self._members)]},
            "zoo": None,
            "classes": self._classes,
            "checkpoint_every": self.every,
            "data": data,
            "fingerprint": {"seed": FINGERPRINT_SEED, "projections": FINGERPRINT_PROJECTIONS,
                            "of": "the gradient in .grad when optimizer.step() ran, float64, "
                                  "parameters flattened in model.parameters order"},
        }
        if self._known is not None:
            manifest["zoo"] = {"spec": self._known[0], "names": self._known[1]}
        if self._norm_sites:
            manifest["batchnorm"] = {
                "modules": self._norm_sites,
                "of": "BatchNorm modules with running statistics; a step trained with them in training mode lists them "
                      "in its record's batchnorm_train (its batch normalized by its own statistics, the running ones "
                      "updated: checkpoints hold them)"}
        if self._mask_sites:
            manifest["dropout"] = {
                "sites": [{"module": n, "p": self._site_p[n]} for n in self._mask_sites],
                "of": "nn.Dropout modules; a step trained with them on keeps their masks (0 or 1, bits packed) in its "
                      "record's masks file, in this order"}
        self._write_json("manifest.json", manifest)
        self._save(0)

    def _write_json(self, name, obj):
        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=1)
        _atomic(os.path.join(self.out, name), write)

    def _flatten(self, tensors, which):
        """The tensors (None: zeros) in float64 on the CPU, one after another, in buffer `which`
        (0 or 1) of the recorder's own."""
        if self._flat[which] is None:
            self._flat[which] = torch.empty(sum(p.numel() for p in self._order), dtype=torch.float64)
        flat, at = self._flat[which], 0
        for t, p in zip(tensors, self._order):
            part = flat[at:at + p.numel()]
            if t is None:
                part.zero_()
            else:
                part.copy_(t.detach().reshape(-1))
            at += p.numel()
        return flat

    def _project(self, g):
        """The products of float64 g [numel] with the fingerprint's vectors, a chunk at a time."""
        out, n = torch.zeros(FINGERPRINT_PROJECTIONS, dtype=torch.float64), g.numel()
        for a in range(0, n, _SIGN_CHUNK):
            part = self._sign_chunk[:, :min(n - a, _SIGN_CHUNK)]
            part.copy_(self._signs[:, a:a + part.shape[1]])
            out += part @ g[a:a + part.shape[1]]
        return [float(v) for v in out]

    def _applied_is_raw(self):
        """True when each parameter's .grad is the gradient its backward passes computed."""
        for p, r in zip(self._order, self._raw):
            if r is None:
                if p.grad is not None and bool(p.grad.any()):
                    return False
            elif p.grad is None or not torch.equal(p.grad, r):
                return False
        return True

    def _gradient_fingerprint(self):
        """The norm of the gradient about to be applied and its products with the fixed vectors;
        with grad_scale when it is a uniform multiple of the raw gradient other than 1."""
        with torch.no_grad():
            g = self._flatten([p.grad for p in self._order], 0)
            g_sq = float(g @ g)
            out = {"grad_norm": math.sqrt(g_sq), "grad_proj": self._project(g)}
            # A parameter no backward reached has a zero raw gradient.
            if any(r is not None for r in self._raw) and not self._applied_is_raw():
                raw = self._flatten(self._raw, 1)
                raw_sq = float(raw @ raw)
                if raw_sq > 0:
                    cross = float(g @ raw)
                    scale = cross / raw_sq
                    # |g - scale raw|^2 = |g|^2 - cross^2 / |raw|^2: the float64 cancellation leaves
                    # about 1e-8 of |g|, far below the 1e-5 asked.
                    off = math.sqrt(max(g_sq - cross * scale, 0.0)) / max(math.sqrt(g_sq), 1e-300)
                    if off <= 1e-5 and abs(scale - 1) > 1e-6:
                        out["grad_scale"] = scale
            self._raw = [None] * len(self._order)
            return out

    def _save(self, k):
        """Weights and optimizer state after k steps; the weights file last (it marks the pair)."""
        base = os.path.join(self.out, "checkpoints", "step_%08d" % k)
        _atomic(base + ".optim.pt", lambda tmp: torch.save(_to_cpu(self.optimizer.state_dict()), tmp))
        _atomic(base + ".pt", lambda tmp: torch.save(_to_cpu(self.model.state_dict()), tmp))

    def step(self, batch, loss=None, inputs=None):
        """Records the step just taken: rec.step(batch, loss) or, with the training set wrapped
        in Tracked, rec.step(loss). `batch` the training indices it used (a tensor or a list),
        `loss` its batch loss (a tensor or a float), `inputs` (optional) the inputs fed to the
        model when they are not the stored rows train[0][batch] (augmentation; by default the
        recorder takes them from the step's training forward). Call after optimizer.step()."""
        if self.closed:
            raise RuntimeError("the recorder is closed")
        if self._rates is None:
            raise RuntimeError("call rec.step() after optimizer.step(), once per step (the step of the optimizer given "
                               "to the Recorder: one made later is not recorded; record each phase as its own run)")
        if self._calls > 1:
            raise ValueError("step %d: optimizer.step() ran %d times since the last rec.step: call rec.step(...) after "
                             "every optimizer.step() (each step's weights and batch are recorded with it)"
                             % (self.k, self._calls))
        used, self._used_at_step = self._used_at_step, []
        if len(used) == 1:  # the step's forward is the one its backward reached, not a later one
            self._fed_at_step = used[0]["x"]
            if used[0]["masks"] is not None:
                self._masks_at_step = used[0]["masks"]
        rows = sum(int(f["x"].shape[0]) if f["x"].dim() > 0 else 0 for f in used) if len(used) > 1 else 0
        if loss is None:  # rec.step(loss): the batch the Tracked training set handed out
            batch, loss = self._tracked_batch(rows), batch
        # The optimizer's settings as this step used them: a scheduler may have changed momentum or
        # betas (OneCycleLR's cycle_momentum); recorded with the step when not the manifest's.
        if _group_mismatch(self._settings):
            raise ValueError("step %d: the parameter groups' %s differ; groups may differ in their learning rate and "
                             "weight decay only" % (self.k, ", ".join(_group_mismatch(self._settings))))
        try:  # at every step: a loop's own model.train() switches Dropout or BatchNorm back on
            _check_model(self.model, self._mask_sites, self._norm_sites)
        except ValueError as e:
            raise ValueError("step %d: %s (the loop switched the module's mode after the Recorder saw the model, "
                             "for example with model.train())" % (self.k, e)) from None
        idx = [int(i) for i in torch.as_tensor(batch).reshape(-1).tolist()]
        if not idx or min(idx) < 0 or max(idx) >= self.n_train:
            raise ValueError("batch indices must be in 0..%d" % (self.n_train - 1))
        k = self.k
        loss_value, accumulated = self._step_loss(k, used, rows, idx, loss, inputs)  # before any file of the step
        if self.every == 1 or k % self.every == 0:
            self._save(k + 1)
        elif (k + 1) % self.every == 0:
            self._save(k + 1)
        rec = {"step": k, "lr": self._rates[0], "batch": idx, "loss": loss_value}
        rec.update(self._fingerprint)
        fed = inputs if inputs is not None else self._fed_at_step
        self._fed_at_step = None
        if accumulated:
            rec["accumulated"] = len(used)
            fed = torch.cat([f["x"].detach() for f in used])
        if fed is not None:
            self._store_inputs(k, rec, fed, idx, inputs is not None)
        autocast = sorted({f["autocast"] for f in used if f["autocast"]})
        if autocast:  # mixed precision: verified against float64, the step cannot agree
            rec["autocast"] = autocast[0]
            if not self._warned_autocast:
                self._warned_autocast = True
                warnings.warn("step %d: the model's forward ran under torch.autocast (%s): the analysis recomputes "
                              "each step from the float32 model in float64 and will not verify such steps; train "
                              "in float32 to analyze the run" % (k, autocast[0]))
        masks, self._masks_at_step = self._masks_at_step, None
        if masks and any(n in masks for n in self._mask_sites) and (self.every == 1 or k % self.every == 0):
            rec.update(self._write_masks(k, masks, len(idx)))  # the analyzable steps' masks
        if masks and any(n in masks for n in self._norm_sites):
            rec["batchnorm_train"] = [n for n in self._norm_sites if n in masks]
        if len(set(self._rates)) > 1:
            rec["lrs"] = self._rates
        if self._settings != self._manifest_settings:
            rec["groups"] = self._settings
        self._log.write(json.dumps(rec) + "\n")
        self._log.flush()
        self._rates = None
        self._calls = 0
        self.k += 1

    def _write_masks(self, k, masks, rows):
        """Step k's Dropout masks in one file, the sites' bits packed in the manifest's order."""
        names = [n for n in self._mask_sites if n in masks]
        for n in names:
            if masks[n].dim() == 0 or masks[n].shape[0] != rows:
                raise ValueError("step %d: module '%s' (Dropout) ran on %s inputs, the batch has %d rows: the masks "
                                 "of the step's last training forward must be the batch's" % (k, n, tuple(masks[n].shape), rows))
        bits = np.packbits(torch.cat([masks[n].reshape(-1) for n in names]).numpy().astype(np.uint8))
        name = "data/masks/step_%08d.npy" % k
        os.makedirs(os.path.join(self.out, "data", "masks"), exist_ok=True)
        _save_npy(os.path.join(self.out, name), bits)
        return {"masks": name, "mask_shapes": {n: list(masks[n].shape) for n in names}}

    def _step_loss(self, k, used, rows, idx, loss, inputs):
        """The step's loss and whether it accumulated micro-batches: with several forwards that
        together hold the batch, the batch's loss from their outputs (and their masks joined);
        else the loss passed, which must be the declared one. Refuses a gradient left in .grad."""
        self._check_constants(k)
        leftover, self._leftover_at_step = self._leftover_at_step, None
        if leftover is not None:
            raise ValueError("step %d: parameter '%s' held a gradient in .grad when this step's backward began, "
                             "and optimizer.step() applied the sum: call optimizer.zero_grad() before each step's "
                             "backward (pathkernel analyzes steps on their batch's gradient)" % (k, leftover))
        value = float(torch.as_tensor(loss).item())
        accumulated = inputs is None and rows == len(idx) and _join(used)
        if len(used) > 1 and not accumulated:
            raise ValueError("step %d: the backward passes reached %d training forwards (%d rows in all) for a batch "
                             "of %d examples, which are neither one forward of the batch nor micro-batches that make "
                             "it up: sharpness-aware minimization (a second forward and backward at perturbed "
                             "weights), a loss over two views of the batch? pathkernel analyzes steps whose "
                             "gradient is the batch loss's at the step's weights (gradient accumulation is "
                             "recognized when rec.step gets no inputs=)" % (k, len(used), rows, len(idx)))
        if accumulated:
            value = self._batch_loss(torch.cat([f["y"] for f in used]), idx)
            if self._masks_at_step:
                self._masks_at_step = self._accumulated_masks(k, used)
        else:
            self._check_loss(k, used, idx, value)
        return value, accumulated

    def _check_constants(self, k):
        """The parameters the run does not train are as they were when the Recorder was made."""
        for name, p, value in self._constants:
            if p.requires_grad and name in self._frozen:
                raise ValueError("step %d: parameter '%s' had requires_grad=False when the Recorder was made and is "
                                 "trained now: record each stage of a progressive unfreezing as its own run (a new "
                                 "Recorder and optimizer when the parameters it trains change)" % (k, name))
            if not torch.equal(p.detach(), value):
                raise ValueError("step %d: parameter '%s', which this optimizer does not train, changed (a second "
                                 "optimizer, or an edit outside optimizer.step()): the analysis holds it constant; "
                                 "give one optimizer every trained parameter" % (k, name))
        for name, b, value in self._buffers:
            if not torch.equal(b.detach(), value):
                raise ValueError("step %d: buffer '%s' of the model changed (a module that updates its own state in "
                                 "training): pathkernel holds a model's buffers as model.pt has them, BatchNorm's "
                                 "running statistics excepted" % (k, name))
        for name, p in zip(self.param_names, self._order):
            if name not in self._frozen and not p.requires_grad:
                raise ValueError("step %d: parameter '%s' was trained when the Recorder was made and has "
                                 "requires_grad=False now: record each stage of a freezing schedule as its own run"
                                 % (k, name))

    def _store_inputs(self, k, rec, fed, idx, given):
        """The inputs the step was computed on, stored with it when they are not the batch's rows."""
        fed = torch.as_tensor(fed).detach().to(device="cpu", dtype=self._train_x.dtype)
        stored = self._train_x[torch.as_tensor(idx)]
        if fed.shape != stored.shape:
            if given:
                raise ValueError("step %d: inputs of shape %s for a batch of %s" % (k, tuple(fed.shape), tuple(stored.shape)))
        elif not torch.equal(fed, stored):  # augmented: stored with the step, as fed
            name = "data/batches/step_%08d_x.npy" % k
            os.makedirs(os.path.join(self.out, "data", "batches"), exist_ok=True)
            _save_npy(os.path.join(self.out, name), fed.contiguous().numpy())
            rec["inputs"] = name

    def _batch_loss(self, out, idx):
        """The declared loss of outputs `out` [batch, C] (as the model computed them) on batch idx."""
        out = out.detach().to(device="cpu", dtype=torch.float32)
        target = self._train_y[torch.as_tensor(idx)]
        with torch.no_grad():
            if self._loss == "ce":
                return float(torch.nn.functional.cross_entropy(out, target, label_smoothing=self._smoothing))
            return float(0.5 * (out - target.to(torch.float32)).pow(2).sum(1).mean())

    def _check_loss(self, k, used, idx, loss):
        """The loss the loop passed must be the declared loss of the step's training forward: a
        weighted cross-entropy, a sum, a penalty added, or F.mse_loss's mean for "mse" is another
        objective, whose steps no analysis of the declared loss verifies."""
        if len(used) != 1 or used[0]["y"].dim() != 2 or used[0]["y"].shape[0] != len(idx):
            return
        mine = self._batch_loss(used[0]["y"], idx)
        if abs(loss - mine) <= 1e-4 * max(abs(mine), 1e-12):
            return
        declared = ("the mean cross-entropy" if self._loss == "ce"
                    else "the mean over the batch of half the summed squared error")
        if self._loss == "ce" and self._smoothing:
            declared += " with label_smoothing=%.6g" % self._smoothing
        smoothed = self._smoothing_of(used[0]["y"], idx, loss) if self._loss == "ce" else None
        if smoothed is not None:
            raise ValueError("step %d: the loss passed to rec.step (%.7g) is not %s of the model's outputs on the "
                             "batch (%.7g), but it is their cross-entropy with label_smoothing=%.6g: pass "
                             "label_smoothing=%.6g to Recorder(...)" % (k, loss, declared, mine, smoothed, smoothed))
        raise ValueError("step %d: the loss passed to rec.step (%.7g) is not %s of the model's outputs on the batch "
                         "(%.7g): label smoothing (Recorder(..., label_smoothing=...)), class weights, a reduction "
                         "other than the mean, a penalty added to it%s, targets other than the stored ones (noisy "
                         "or mixed labels: mixup, CutMix)? pathkernel analyzes loss='ce' (mean cross-entropy, "
                         "optionally label-smoothed) or 'mse' as defined, and verifies each step against it"
                         % (k, loss, declared, mine, ", F.mse_loss's mean over outputs" if self._loss == "mse" else ""))

    def _smoothing_of(self, out, idx, loss):
        """The label smoothing epsilon (to 4 digits) whose cross-entropy of `out` on batch idx is
        `loss`, or None: the smoothed loss is (1 - eps) CE + eps U, U the mean over the classes of
        -log softmax, so eps = (loss - CE) / (U - CE)."""
        out = out.detach().to(device="cpu", dtype=torch.float64)
        target = self._train_y[torch.as_tensor(idx)]
        with torch.no_grad():
            ce = float(torch.nn.functional.cross_entropy(out, target))
            uniform = float(-torch.log_softmax(out, 1).mean())
            if not abs(uniform - ce) > 1e-6 * max(abs(ce), 1e-12):
                return None
            eps = float("%.4g" % ((loss - ce) / (uniform - ce)))
            if not 0.0 < eps < 1.0:
                return None
            again = float(torch.nn.functional.cross_entropy(out, target, label_smoothing=eps))
        return eps if abs(loss - again) <= 1e-4 * max(abs(again), 1e-12) else None

    def _accumulated_masks(self, k, used):
        """The Dropout masks of an accumulated step: each site's, its forwards' rows together.
        BatchNorm in training mode normalized each micro-batch by its own statistics, which no
        batch of the analysis reproduces: refused."""
        every = [f["masks"] or {} for f in used]
        if any(n in m for m in every for n in self._norm_sites):
            raise ValueError("step %d: gradient accumulation over %d forwards with BatchNorm in training mode: each "
                             "micro-batch was normalized by its own statistics, which the analysis cannot reproduce "
                             "(take one forward per optimizer.step(), or BatchNorm in eval mode)" % (k, len(used)))
        masks = {}
        for n in self._mask_sites:
            parts = [m.get(n) for m in every]
            if all(p is not None for p in parts):
                masks[n] = torch.cat(parts)
            elif any(p is not None for p in parts):
                raise ValueError("step %d: module '%s' (Dropout) was in training mode in some of the step's %d "
                                 "forwards only" % (k, n, len(used)))
        return masks

    def _tracked_batch(self, rows=0):
        if self._tracked is None:
            raise ValueError("rec.step(loss) needs the training set wrapped in Tracked(...) (or pass the batch: "
                             "rec.step(indices, loss))")
        fetched, self._tracked.fetched = self._tracked.fetched, []
        if rows and len(fetched) >= rows:  # accumulated: the batch is every micro-batch's rows
            return fetched[-rows:]
        fed = self._fed_at_step
        n = int(fed.shape[0]) if isinstance(fed, torch.Tensor) and fed.dim() > 0 else len(fetched)
        if not fetched or len(fetched) < n:
            raise ValueError("step %d: the Tracked training set handed out %d examples since the last step, the "
                             "model was fed %d: the loader must fetch in this process (num_workers=0), or use "
                             "Indexed and rec.step(indices, loss)" % (self.k, len(fetched), n))
        return fetched[-n:]

    def close(self):
        """Marks the run complete (the last step's weights are always saved)."""
        if self.closed:
            return
        if not os.path.exists(os.path.join(self.out, "checkpoints", "step_%08d.pt" % self.k)):
            self._save(self.k)
        for h in (self._hook, self._post_hook):
            if h is not None:
                h.remove()
        self._masks.remove()
        for h in self._grad_hooks:
            h.remove()
        self._log.close()
        done = {"steps": self.k}
        accuracy = self._test_accuracy()
        if accuracy is not None:
            done["test_accuracy"] = accuracy
        self._write_json("COMPLETE", done)
        self.closed = True

    def _test_accuracy(self):
        """The final model's accuracy on the recorded test split (cross-entropy runs), as it
        predicts (eval mode: BatchNorm's running statistics, Dropout off; the modules' modes
        restored afterwards), in chunks; None without a test split."""
        path = os.path.join(self.out, "data", "test_x.npy")
        if self._loss != "ce" or not os.path.exists(path):
            return None
        x = torch.from_numpy(np.load(path))
        y = torch.from_numpy(np.load(os.path.join(self.out, "data", "test_y.npy")))
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        correct = 0
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad():
                for i in range(0, x.shape[0], 1000):
                    out = self.model(x[i:i + 1000].to(device))
                    correct += int((out.argmax(1).cpu() == y[i:i + 1000]).sum())
        finally:
            for m, training in modes:
                m.training = training
        self._fed = None  # that forward was no training step
        return correct / x.shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._log.close()
            for h in (self._hook, self._post_hook):
                if h is not None:
                    h.remove()
            self._masks.remove()
        return False
