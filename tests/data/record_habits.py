"""Records one small Fashion-MNIST run with one habit of real training loops, for the e2e tests
of the per-step verification of recorded runs (tests/trajectory/test_recorded_run.cpp):

    python3 tests/data/record_habits.py HABIT OUT

clean        the README's loop
functional   dropout through F.dropout(training=True), which no module mode shows
augment      the loop trains on flipped and shifted inputs; the recorder stores them with each step
unstored     the same with capture_inputs=False: the recorder stores only the plain rows
clip         clip_grad_norm_ scales the gradient between backward() and optimizer.step() (the
             recorder records the scale: analyzed exactly)
clipvalue    clip_grad_value_ clips each entry (not a uniform scale: refused by the analysis)
onecycle     OneCycleLR with cycle_momentum=True changes SGD's momentum every step (recorded with
             each step: analyzed exactly)
onecycle_adam  the same with Adam: beta1 changes every step
groups       AdamW with the usual parameter groups: no weight decay on biases, the output layer at
             half the rate, and a cosine schedule (analyzed exactly)
groups_sgd   plain SGD (no momentum) with the same groups: weight decay on weights only, the
             output layer at half the rate (the analysis takes the optimizer's route)
rmsprop      RMSprop, centered, with momentum 0.9 and weight decay
adagrad      Adagrad with a rate decay and weight decay
adadelta     Adadelta (lr 1.0, pytorch/examples mnist's optimizer) with StepLR
tokens       int64 token inputs: each image as 49 tokens (7x7 patches, 16 brightness levels),
             an nn.Embedding, an LSTM and a linear head, AdamW (analyzed through its TorchScript)
untracked    rec.step(loss) without the batch, the training set not wrapped in Tracked: refused at
             step 0, naming Tracked
group_momentum  parameter groups with different momentum (refused by Recorder(), naming it)
every5       checkpoint_every=5 with momentum (refused by Recorder() before any file is written)
tuple        a model whose forward returns (logits, features), recorded with output=0
tuple_unnamed  the same without output=: refused by Recorder(), naming output=
moved        the weights are changed outside optimizer.step() after step 10
train_mode   a Dropout module put back in training mode by the loop's model.train() at step 5
dropout      two nn.Dropout modules in training mode (p 0.1 on the inputs, 0.5 on the hidden layer)
             with SGD and momentum; the loop switches to eval mode for steps 5-7 of every 10 (the
             recorder keeps each trained step's masks: analyzed exactly)
accumulate   gradient accumulation: each step's 32 examples as two micro-batches of 16, each loss
             divided by 2 and backpropagated, one optimizer.step() (SGD with momentum), the inputs
             flipped (recorded as one step of the two forwards' rows: analyzed exactly)
accumulate_dropout  the same with the dropout habit's model (each micro-batch's masks, joined)
accumulate_nodiv    the micro-batch losses not divided by 2 (the gradient twice the batch's:
             refused by the analysis, naming the accumulation)
accumulate_bn       the same with the batchnorm habit's model (each micro-batch normalized by its
             own statistics: refused by the recorder at step 0)
logforward   the dropout habit's model with a forward of 4 rows, gradients on, after backward() and
             before optimizer.step() (logging): not the step's forward, which its backward reached
             (its batch, inputs and masks recorded: analyzed exactly)
nozero       optimizer.zero_grad() left out after step 0 (each step applies the sum of every
             gradient so far: refused by the recorder at step 1, naming zero_grad)
smoothing    cross-entropy with label_smoothing=0.1, passed to rec.step (another loss than the
             declared mean cross-entropy: refused by the recorder at step 0, naming the smoothing)
smoothed     the same, declared to Recorder(label_smoothing=0.1) (analyzed exactly)
checkpointed  activation checkpointing, torch.utils.checkpoint(use_reentrant=False), of the model's
             body: its forward runs again in the backward pass (traced; analyzed exactly)
checkpointed_reentrant  the same with use_reentrant=True, which torch.jit.trace fails on (refused
             by Recorder(), saying so)
mse          loss="mse" on one-hot float32 targets (analyzed exactly)
ema          an exponential moving average of the weights (swa_utils.AveragedModel, made after the
             Recorder, so with copies of its hooks), evaluated every step (analyzed exactly)
autocast     the forward under torch.autocast("cpu", bfloat16), mixed precision (recorded with the
             dtype; refused by the analysis, naming autocast)
frozen       the first Linear frozen (requires_grad=False, a fine-tuned backbone), the optimizer given
             every parameter (SGD with momentum): the kernel is over the trained head (analyzed exactly)
head_only    the optimizer given the head's parameters only (AdamW), the backbone still requiring
             gradients: held constant as well (analyzed exactly)
unused       a Linear the forward never uses, in the optimizer (AdamW skips it: held constant)
unfreeze     the frozen habit, unfrozen at step 10 (progressive unfreezing: refused by the recorder)
two_optimizers  head_only with a second optimizer training the backbone (refused by the recorder at
             step 0: the recorded optimizer does not train it)
skipped      rec.step left out at step 3 (optimizer.step() ran twice before the next rec.step: refused
             by the recorder at step 3)
tied         a hidden layer applied twice (one module under two names) and a weight shared by two
             Linear layers (tied weights), Adam (analyzed exactly)
sparse       the tokens habit with nn.Embedding(sparse=True) (refused by Recorder(), naming the module)
counting     a module that updates a buffer of its own in training mode (refused by the recorder at
             step 0, naming the buffer)
weight_norm  torch.nn.utils.weight_norm on the first Linear (its weight computed by a hook from
             weight_g and weight_v: not the zoo's; analyzed exactly through the traced model)
spectral     spectral_norm's parametrization on the first Linear, whose power iteration updates a
             buffer at every training forward (refused by the recorder at step 0, naming it)
mixup        mixup: inputs and targets mixed with the batch reversed (refused by the recorder at step 0:
             not the declared loss of the stored targets)
closure      optimizer.step(closure): zero_grad, forward and backward inside the closure, the loss
             it returns passed to rec.step (analyzed exactly)
new_optimizer  a new optimizer made at step 10 (a second phase): its steps are not the recorded
             optimizer's (refused at step 10, saying so)
sam          sharpness-aware minimization: the gradient applied is the one at weights moved up the
             first backward's gradient (a second forward and backward each step: refused by the
             recorder at step 0)
batchnorm    a CNN with BatchNorm2d and BatchNorm1d in training mode, SGD with momentum; eval mode for
             steps 5-7 of every 10 (batch statistics on the trained steps, running statistics
             recorded with the weights: analyzed exactly)
"""
import os
import sys

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "python"))
sys.path.insert(0, os.path.join(here, "..", "..", "examples"))
from pathkernel_record import Recorder  # noqa: E402
from record_mlp import fashion_mnist  # noqa: E402


class TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        h = torch.tanh(self.fc1(x.flatten(1)))
        return self.fc2(h), h


class UnusedLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 64)
        self.spare = torch.nn.Linear(64, 10)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


class TiedLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(784, 32)
        self.mid = torch.nn.Linear(32, 32)
        self.again = self.mid  # the same layer under a second name, applied twice
        self.up = torch.nn.Linear(32, 32)
        self.up.weight = self.mid.weight  # a weight shared by two layers
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        h = torch.tanh(self.enc(x.flatten(1)))
        h = torch.tanh(self.again(torch.tanh(self.mid(h))))
        return self.head(torch.tanh(self.up(h)))


class Counting(torch.nn.Module):
    """Counts its training forwards in a buffer."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 64)
        self.fc2 = torch.nn.Linear(64, 10)
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x):
        if self.training:
            self.seen += x.shape[0]
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


class TokenLstm(torch.nn.Module):
    def __init__(self, sparse=False):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8, sparse=sparse)
        self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, tokens):
        h, _ = self.lstm(self.embed(tokens))
        return self.head(h[:, -1])


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def tokens_of(x):
    """Fashion-MNIST images [N, 1, 28, 28] as 49 tokens each: the mean brightness of each 4x4
    patch, in 16 levels (int64)."""
    patches = F.avg_pool2d(x, 4).flatten(1)  # [N, 49], in [0, 1] before normalization
    lo, hi = patches.min(), patches.max()
    return ((patches - lo) / (hi - lo) * 15.999).floor().long()


class Checkpointed(torch.nn.Module):
    """Activation checkpointing of its body (torch.utils.checkpoint): the body's forward runs
    again in the backward pass."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.Tanh())
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=self.reentrant))


class FunctionalDropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(F.dropout(torch.tanh(self.fc1(x.flatten(1))), 0.3, training=True))


def main():
    habit, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    X, y = fashion_mnist("/usr/share/datasets/fashion-mnist", "train", 600)
    Xt, yt = fashion_mnist("/usr/share/datasets/fashion-mnist", "test", 100)
    if habit in ("tokens", "sparse"):
        X, Xt = tokens_of(X), tokens_of(Xt)
        model = TokenLstm(sparse=habit == "sparse")
    elif habit == "counting":
        model = Counting()
    elif habit == "functional":
        model = FunctionalDropout()
    elif habit.startswith("checkpointed"):
        model = Checkpointed(reentrant=habit == "checkpointed_reentrant")
    elif habit.startswith("tuple"):
        model = TwoOutputs()
    elif habit in ("dropout", "accumulate_dropout", "logforward"):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.1), torch.nn.Linear(784, 64),
                                    torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(64, 10))
    elif habit in ("batchnorm", "accumulate_bn"):
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.BatchNorm2d(4), torch.nn.Tanh(),
                                    torch.nn.Flatten(), torch.nn.Linear(4 * 13 * 13, 32), torch.nn.BatchNorm1d(32),
                                    torch.nn.Tanh(), torch.nn.Linear(32, 10))
    elif habit == "unused":
        model = UnusedLayer()
    elif habit == "tied":
        model = TiedLayers()
    elif habit == "train_mode":
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.Tanh(),
                                    torch.nn.Dropout(0.3), torch.nn.Linear(64, 10))
        model.eval()
    else:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.Tanh(),
                                    torch.nn.Linear(64, 10))
    if habit == "weight_norm":
        model[1] = torch.nn.utils.weight_norm(model[1])
    elif habit == "spectral":
        model[1] = torch.nn.utils.parametrizations.spectral_norm(model[1])
    if habit in ("frozen", "unfreeze"):
        for p in model[1].parameters():
            p.requires_grad_(False)
    second = None
    if habit in ("head_only", "two_optimizers"):
        opt = torch.optim.AdamW(model[3].parameters(), lr=2e-3, weight_decay=0.05)
        sched = None
        if habit == "two_optimizers":
            second = torch.optim.SGD(model[1].parameters(), lr=0.1)
    elif habit in ("unused", "tied"):
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        sched = None
    elif habit == "onecycle":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=30)
    elif habit == "onecycle_adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=30)
    elif habit == "groups":
        decay = [p for n, p in model.named_parameters() if n.endswith("weight") and not n.startswith("3.")]
        plain = [p for n, p in model.named_parameters() if n.endswith("bias")]
        head = [p for n, p in model.named_parameters() if n == "3.weight"]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                 {"params": plain, "weight_decay": 0.0},
                                 {"params": head, "weight_decay": 0.05, "lr": 1e-3}], lr=2e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
    elif habit == "groups_sgd":
        decay = [p for n, p in model.named_parameters() if n == "1.weight"]
        plain = [p for n, p in model.named_parameters() if n.endswith("bias")]
        head = [p for n, p in model.named_parameters() if n == "3.weight"]
        opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-3}, {"params": plain},
                               {"params": head, "weight_decay": 5e-3, "lr": 0.05}], lr=0.1)
        sched = None
    elif habit == "rmsprop":
        opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-4)
        sched = None
    elif habit == "adagrad":
        opt = torch.optim.Adagrad(model.parameters(), lr=0.05, lr_decay=0.01, weight_decay=1e-4)
        sched = None
    elif habit == "adadelta":
        opt = torch.optim.Adadelta(model.parameters(), lr=1.0, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.7)
    elif habit == "tokens":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
        sched = None
    elif habit == "group_momentum":
        opt = torch.optim.SGD([{"params": model[1].parameters(), "momentum": 0.9},
                               {"params": model[3].parameters()}], lr=0.1, momentum=0.5)
        sched = None
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        sched = None
    if habit == "mse":  # float32 targets [N, C] as fed
        y, yt = F.one_hot(y, 10).float(), F.one_hot(yt, 10).float()
    rec = Recorder(out, model, opt, train=(X, y), test=(Xt, yt), loss="mse" if habit == "mse" else "ce",
                   label_smoothing=0.1 if habit == "smoothed" else 0.0,
                   checkpoint_every=5 if habit == "every5" else 1, capture_inputs=habit != "unstored",
                   output=0 if habit == "tuple" else None,
                   classes=None if habit == "clean" else FASHION_CLASSES)
    ema = None
    if habit == "ema":  # made after the Recorder: its deep copy carries the Recorder's hooks
        ema = torch.optim.swa_utils.AveragedModel(model, avg_fn=lambda avg, new, n: 0.9 * avg + 0.1 * new)
    g = torch.Generator().manual_seed(0)
    # The habits added with issue 25's fine-tuning work take 15 steps (enough for every check).
    short = ("frozen", "head_only", "unused", "tied", "weight_norm", "closure", "unfreeze", "two_optimizers",
             "new_optimizer", "skipped", "sam", "mixup", "spectral", "counting", "sparse", "smoothed",
             "checkpointed", "ema", "mse")
    for step in range(15 if habit in short else 30):
        if habit == "train_mode" and step == 5:
            model.train()
        if habit in ("dropout", "batchnorm", "accumulate_dropout", "logforward"):
            model.train(step % 10 not in (5, 6, 7))
        idx = torch.randint(0, X.shape[0], (32,), generator=g)
        x = X[idx]
        if habit in ("augment", "unstored", "accumulate"):
            x = torch.roll(torch.flip(x, dims=[3]), shifts=2, dims=2)
        if habit == "new_optimizer" and step == 10:
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
        if habit == "unfreeze" and step == 10:
            for p in model[1].parameters():
                p.requires_grad_(True)
        if habit != "nozero" or step == 0:
            opt.zero_grad()
        if second is not None:
            second.zero_grad()
        if habit == "closure":
            def closure():
                opt.zero_grad()
                out = F.cross_entropy(model(x), y[idx])
                out.backward()
                return out
            loss = opt.step(closure)
            rec.step(idx, loss)
            continue
        if habit == "mixup":  # inputs and targets mixed with the batch reversed
            mixed = model(0.7 * x + 0.3 * x.flip(0))
            loss = 0.7 * F.cross_entropy(mixed, y[idx]) + 0.3 * F.cross_entropy(mixed, y[idx].flip(0))
            loss.backward()
        elif habit.startswith("accumulate"):  # two micro-batches, one optimizer.step()
            for half in (slice(0, 16), slice(16, 32)):
                loss = F.cross_entropy(model(x[half]), y[idx][half]) / (1 if habit == "accumulate_nodiv" else 2)
                loss.backward()
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=habit == "autocast"):
                out = model(x)
            if habit == "mse":  # the mean over the batch of half the summed squared error
                loss = 0.5 * (out - y[idx]).pow(2).sum(1).mean()
            else:
                loss = F.cross_entropy(out[0] if habit.startswith("tuple") else out.float(), y[idx],
                                       label_smoothing=0.1 if habit in ("smoothing", "smoothed") else 0.0)
            loss.backward()
        if habit == "sam":  # the second forward and backward, at w + rho g / |g|
            with torch.no_grad():
                norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
                moves = [0.05 * p.grad / norm for p in model.parameters()]
                for p, e in zip(model.parameters(), moves):
                    p.add_(e)
            opt.zero_grad()
            F.cross_entropy(model(x), y[idx]).backward()
            with torch.no_grad():
                for p, e in zip(model.parameters(), moves):
                    p.sub_(e)
        if habit == "logforward":
            model(x[:4]).sum()  # a logging forward with gradients on: no backward reaches it
        if habit == "clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
        if habit == "clipvalue":
            torch.nn.utils.clip_grad_value_(model.parameters(), clip_value=0.002)
        opt.step()
        if second is not None:
            second.step()
        if habit == "moved" and step == 10:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        if habit == "skipped" and step == 3:
            pass  # the loop's rec.step left out
        elif habit == "untracked":
            rec.step(loss)
        else:
            rec.step(idx, loss)
        if sched is not None:
            sched.step()
        if ema is not None:  # the average's update and an evaluation of it, as a loop logs it
            ema.update_parameters(model)
            with torch.no_grad():
                ema(Xt[:10])
    rec.close()


if __name__ == "__main__":
    main()
