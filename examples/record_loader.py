"""The training loop people write, recorded for pathkernel: a Dataset, a shuffling DataLoader and
`for data, target in loader`, as pytorch/examples' mnist does, on Debian's Fashion-MNIST.

    python3 examples/record_loader.py runs/py-loader [--epochs 1] [--train-limit 2000]
    pathkernel analyze runs/py-loader --probes 16 --out runs/py-loader-analysis

The lines marked `# pathkernel` are all that recording adds to the loop (three lines, and two
changed: the loader's dataset and the loop's variables).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pathkernel_record import Indexed, Recorder  # noqa: E402  pathkernel
from record_mlp import idx  # noqa: E402


class FashionMnist(Dataset):
    """Images normalized as pytorch/examples does for MNIST (mean 0.1307, std 0.3081)."""

    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]

    def __init__(self, root, train, limit):
        prefix = "train" if train else "t10k"
        self.images = idx(os.path.join(root, "%s-images-idx3-ubyte.gz" % prefix))[:limit]
        self.labels = idx(os.path.join(root, "%s-labels-idx1-ubyte.gz" % prefix))[:limit]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = torch.tensor(self.images[i], dtype=torch.float32).unsqueeze(0) / 255.0
        return (x - 0.1307) / 0.3081, int(self.labels[i])


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = torch.nn.Linear(8 * 14 * 14, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def train(model, loader, optimizer, scheduler, rec):
    model.train()
    for data, target, index in loader:  # pathkernel: the loader's items carry their index
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        optimizer.step()
        rec.step(index, loss)  # pathkernel
        scheduler.step()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train-limit", type=int, default=2000)
    a = ap.parse_args()
    torch.manual_seed(1)
    train_set = FashionMnist(a.data, True, a.train_limit)
    test_set = FashionMnist(a.data, False, 500)
    loader = DataLoader(Indexed(train_set), batch_size=a.batch, shuffle=True)  # pathkernel: Indexed(...)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.7)
    rec = Recorder(a.out, model, optimizer, train=train_set, test=test_set)  # pathkernel
    for _ in range(a.epochs):
        train(model, loader, optimizer, scheduler, rec)
    rec.close()  # pathkernel
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x.unsqueeze(0)).argmax(1) == y).sum()) for x, y in test_set)
    print("recorded %d steps in %s; test accuracy %.4f" % (rec.k, a.out, correct / len(test_set)))


if __name__ == "__main__":
    main()
