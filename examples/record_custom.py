"""Record networks the analyzer does not build itself: a small CNN trained with SGD + Nesterov
momentum, or a custom nn.Module with a residual connection and LayerNorm trained with AdamW,
on Fashion-MNIST in plain PyTorch; or, with SGD + momentum, a residual CNN (a stem and two
BatchNorm-free basic blocks, global pooling; rescnn77k is its 77k-parameter width), an LSTM
over the image's rows, a CNN with GroupNorm, a small ViT (7x7 patches, a class token,
self-attention, LayerNorm, GELU), a transformer encoder on int64 token sequences (each image as
49 tokens), pytorch/examples mnist's Net (its Dropout off), a 235k-parameter MLP
(bench/bench_generic.sh compares them with functorch), the zoo's mlp:128:tanh, or a CNN with
BatchNorm in training mode (bncnn). --adamw trains any of them with AdamW, --sgd LR with plain SGD.

    python3 examples/record_custom.py runs/py-cnn --model cnn [--steps 40]
    python3 examples/record_custom.py runs/py-res --model resnorm [--loss mse]
    python3 examples/record_custom.py runs/py-vit --model vit --adamw --steps 200
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


class BasicBlock(torch.nn.Module):
    """ResNet's basic block without BatchNorm: x + conv(relu(conv(x)))."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class ResidualCnn(torch.nn.Module):
    """A conv stem, two basic blocks, global average pooling and a linear head."""

    def __init__(self, channels=16, outputs=10):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.block1 = BasicBlock(channels)
        self.block2 = BasicBlock(channels)
        self.head = torch.nn.Linear(channels, outputs)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = self.block2(self.block1(h))
        return self.head(h.mean(dim=(2, 3)))


class RowLstm(torch.nn.Module):
    """An LSTM reading the image's rows as a sequence of 28 vectors; a linear head on its last state."""

    def __init__(self, hidden=24, outputs=10, width=28):
        super().__init__()
        self.lstm = torch.nn.LSTM(width, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, outputs)

    def forward(self, x):
        seq, _ = self.lstm(x.flatten(1, 2))  # [N, 1, H, W] -> [N, H, W]: H steps of W inputs
        return self.head(seq[:, -1])


def group_norm_cnn():
    """Two convolutions with GroupNorm (which mixes no examples: fine in training mode) and a head."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.GroupNorm(4, 16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(16 * 7 * 7, 10))


class SmallVit(torch.nn.Module):
    """A small vision transformer: 7x7 patches (16 of a 28x28 image), a linear embedding, a class
    token and learned positions, one pre-norm encoder layer (4-head self-attention, LayerNorm,
    GELU MLP; no dropout), a LayerNorm and a linear head on the class token."""

    def __init__(self, dim=32, heads=4, outputs=10):
        super().__init__()
        self.embed = torch.nn.Linear(49, dim)
        self.cls = torch.nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos = torch.nn.Parameter(0.02 * torch.randn(1, 17, dim))
        self.encoder = torch.nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                                        activation="gelu", batch_first=True, norm_first=True)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, outputs)

    def forward(self, x):
        n = x.shape[0]
        patches = x.reshape(n, 4, 7, 4, 7).permute(0, 1, 3, 2, 4).reshape(n, 16, 49)
        h = torch.cat([self.cls.expand(n, 1, self.cls.shape[2]), self.embed(patches)], dim=1) + self.pos
        h = self.encoder(h)
        return self.head(self.norm(h[:, 0]))


class TokenEncoder(torch.nn.Module):
    """A small transformer encoder on int64 token sequences: each image as 49 tokens (the mean
    brightness of each 4x4 patch in 16 levels, tokens_of), a token embedding and learned
    positions, one encoder layer (4-head self-attention, LayerNorm, ReLU MLP; no dropout), mean
    pooling and a linear head."""

    def __init__(self, vocab=16, length=49, dim=32, heads=4, outputs=10):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(0.02 * torch.randn(1, length, dim))
        self.encoder = torch.nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                                        batch_first=True)
        self.head = torch.nn.Linear(dim, outputs)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens) + self.pos).mean(1))


def tokens_of(x):
    """Images [N, 1, 28, 28] as 49 int64 tokens each: the mean brightness of each 4x4 patch, in
    16 levels over the whole set's range."""
    patches = torch.nn.functional.avg_pool2d(x, 4).flatten(1)
    lo, hi = patches.min(), patches.max()
    return ((patches - lo) / (hi - lo) * 15.999).floor().long()


class MnistNet(torch.nn.Module):
    """pytorch/examples mnist's Net (1.2M parameters), its Dropout modules kept (off when recorded)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, 1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = torch.nn.Dropout(0.25)
        self.dropout2 = torch.nn.Dropout(0.5)
        self.fc1 = torch.nn.Linear(9216, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(torch.relu(self.fc1(x)))
        return torch.log_softmax(self.fc2(x), dim=1)


def bn_cnn():
    """A CNN with BatchNorm (trained in training mode: batch statistics, running statistics
    updated): [Conv2d 3x3 pad 1, BatchNorm2d, ReLU, MaxPool2d(2)] x 2 (8 and 16 channels), a
    linear head."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(16 * 7 * 7, 10))


def build(kind):
    if kind == "mlp":  # the zoo's mlp:128:tanh, recognized: the factorized route
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.Tanh(),
                                    torch.nn.Linear(128, 10))
        return model, torch.optim.SGD(model.parameters(), lr=0.1)
    if kind == "bncnn":
        model = bn_cnn()
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind in ("rescnn", "rescnn77k", "lstm", "gncnn", "vit", "tokens", "mnistnet"):
        model = {"rescnn": ResidualCnn, "rescnn77k": lambda: ResidualCnn(channels=46), "lstm": RowLstm,
                 "gncnn": group_norm_cnn, "vit": SmallVit, "tokens": TokenEncoder, "mnistnet": MnistNet}[kind]()
        for m in model.modules():  # Dropout off, as the benchmarks measure these models
            if isinstance(m, torch.nn.Dropout):  # (examples/record_examples_mnist.py trains mnist's Net with it on)
                m.eval()
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind == "mlp235k":  # the zoo's mlp:296:tanh (235k parameters)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 296), torch.nn.Tanh(),
                                    torch.nn.Linear(296, 10))
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
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
    ap.add_argument("--model", choices=("cnn", "mlp", "bncnn", "resnorm", "rescnn", "rescnn77k", "lstm", "gncnn", "vit", "tokens", "mnistnet", "mlp235k"),
                    default="cnn")
    ap.add_argument("--loss", choices=("ce", "mse"), default="ce")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-limit", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adamw", action="store_true", help="AdamW (lr 1e-3, weight decay 0.05) instead of the model's optimizer")
    ap.add_argument("--sgd", type=float, metavar="LR", help="plain SGD at rate LR instead of the model's optimizer")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    X, y = fashion_mnist(a.data, "train", a.train_limit)
    Xt, yt = fashion_mnist(a.data, "test", 500)
    if a.model == "tokens":  # the transformer encoder reads int64 token sequences
        both = tokens_of(torch.cat([X, Xt]))
        X, Xt = both[:X.shape[0]], both[X.shape[0]:]
    if a.loss == "mse":  # the targets exactly as the loss sees them
        y = torch.nn.functional.one_hot(y, 10).float()
        yt = torch.nn.functional.one_hot(yt, 10).float()
    model, opt = build(a.model)
    if a.adamw:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    if a.sgd is not None:
        opt = torch.optim.SGD(model.parameters(), lr=a.sgd)
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
    model.eval()  # predictions: BatchNorm's running statistics, Dropout off
    with torch.no_grad():
        acc = (model(Xt).argmax(1) == (yt if yt.dim() == 1 else yt.argmax(1))).float().mean().item()
    print("recorded %d steps of %s into %s (test accuracy %.3f)" % (a.steps, a.model, a.out, acc))


if __name__ == "__main__":
    main()
