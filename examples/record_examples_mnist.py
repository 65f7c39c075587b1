"""pytorch/examples' mnist training script, as its loop is written, recorded for pathkernel.

The network, train() and test() follow pytorch/examples mnist/main.py: two 3x3 convolutions,
max-pooling, two linear layers, log_softmax outputs and nll_loss, Adadelta (lr 1.0) with StepLR
(gamma 0.7 per epoch), `for batch_idx, (data, target) in enumerate(train_loader)` and
`model.train()` at every epoch. The data are Debian's Fashion-MNIST (no torchvision download),
normalized as main.py normalizes MNIST. Dropout is on in training, as main.py has it (p 0.25
and 0.5): the recorder keeps each step's masks and the analysis computes the batch with them.
The five lines marked `# pathkernel` are all that recording adds:

    /usr/bin/python3 examples/record_examples_mnist.py runs/examples-mnist --epochs 1
    pathkernel analyze runs/examples-mnist --probes 8 --every 10 --out runs/examples-mnist-analysis

--train-limit N trains on the first N images (the tests use a few batches: the network has 1.2M
parameters and the recorder stores every step's weights and Adadelta's state).
"""
import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.optim.lr_scheduler import StepLR

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pathkernel_record import Recorder, Tracked  # noqa: E402  pathkernel
from record_loader import FashionMnist  # noqa: E402

rec = None


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


def train(args, model, device, train_loader, optimizer, epoch):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        rec.step(loss)  # pathkernel
        if batch_idx % args.log_interval == 0:
            print("Train Epoch: {} [{}/{}]\tLoss: {:.6f}".format(
                epoch, batch_idx * len(data), len(train_loader.dataset), loss.item()), file=sys.stderr)


def test(model, device, test_loader):
    model.eval()
    test_loss, correct = 0, 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            correct += output.argmax(dim=1).eq(target).sum().item()
    n = len(test_loader.dataset)
    print("Test set: Average loss: {:.4f}, Accuracy: {}/{} ({:.0f}%)".format(
        test_loss / n, correct, n, 100.0 * correct / n), file=sys.stderr)


def main():
    global rec
    parser = argparse.ArgumentParser()
    parser.add_argument("out", help="the recorded run's folder")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-batch-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--train-limit", type=int, default=60000)
    parser.add_argument("--test-limit", type=int, default=10000)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cpu")

    dataset1 = FashionMnist(args.data, True, args.train_limit)
    dataset2 = FashionMnist(args.data, False, args.test_limit)
    dataset1 = Tracked(dataset1)  # pathkernel
    train_loader = torch.utils.data.DataLoader(dataset1, batch_size=args.batch_size, shuffle=True)
    test_loader = torch.utils.data.DataLoader(dataset2, batch_size=args.test_batch_size)

    model = Net().to(device)
    optimizer = optim.Adadelta(model.parameters(), lr=args.lr)
    rec = Recorder(args.out, model, optimizer, train=dataset1, test=dataset2)  # pathkernel

    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
    for epoch in range(1, args.epochs + 1):
        train(args, model, device, train_loader, optimizer, epoch)
        test(model, device, test_loader)
        scheduler.step()
    rec.close()  # pathkernel


if __name__ == "__main__":
    main()
