"""Writes the TorchScript fixtures of tests/trajectory/test_scripted_model.cpp (torch.jit.script + save).

Run with Debian's python3-torch: python3 tests/data/make_scripted_models.py
The files are committed; this script documents what they hold.
"""
import os
import sys

import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "examples"))
from record_custom import ResidualNorm, RowLstm, SmallVit  # noqa: E402  (modules examples/record_custom.py records)
torch.manual_seed(0)

# The zoo's cnn:2,3:tanh for 1x8x8 inputs and 4 outputs, as an nn.Sequential: conv3x3(pad 1),
# tanh, maxpool 2, conv3x3(pad 1), tanh, maxpool 2, flatten, linear.
cnn = torch.nn.Sequential(
    torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Tanh(), torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.MaxPool2d(2),
    torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 4))
torch.jit.save(torch.jit.script(cnn), os.path.join(here, "scripted_cnn.pt"))


net = ResidualNorm(16, 5, 3)
with torch.no_grad():  # LayerNorm starts at weight 1, bias 0: move it so its gradients are generic
    net.norm.weight.add_(0.3 * torch.randn(5))
    net.norm.bias.add_(0.3 * torch.randn(5))
torch.jit.save(torch.jit.script(net), os.path.join(here, "scripted_resnorm.pt"))


class Prototypes(torch.nn.Module):
    """Logits = -distances to learned prototypes (torch.cdist: neither a forward-mode AD formula
    nor a differentiable backward in torch 1.13: J v by the gradient rows)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(64, 6)
        self.prototypes = torch.nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        return -torch.cdist(torch.tanh(self.embed(x.flatten(1))), self.prototypes)


torch.jit.save(torch.jit.script(Prototypes()), os.path.join(here, "scripted_prototypes.pt"))


class RunningScores(torch.nn.Module):
    """Logits = logcumsumexp over the classes of a tanh MLP's scores (no forward-mode AD formula
    in torch 1.13, a twice-differentiable backward: J v goes by double backward)."""

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(64, 7)
        self.scores = torch.nn.Linear(7, 4)

    def forward(self, x):
        return torch.logcumsumexp(self.scores(torch.tanh(self.hidden(x.flatten(1)))), dim=1)


torch.jit.save(torch.jit.script(RunningScores()), os.path.join(here, "scripted_running_scores.pt"))


class NoParams(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)


torch.jit.save(torch.jit.script(NoParams()), os.path.join(here, "scripted_noparams.pt"))


# The zoo's mlp:5:tanh for 1x8x8 inputs and 3 outputs under the zoo's own parameter names
# (layers.0, layers.1): the model.pt of tests/trajectory/test_trajectory.cpp's recorded copy of a native run,
# which the reader compares with the zoo model it analyzes the run as.
class ZooMlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(64, 5), torch.nn.Linear(5, 3)])

    def forward(self, x):
        h = x.flatten(1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i + 1 < len(self.layers):
                h = torch.tanh(h)
        return h


torch.jit.save(torch.jit.script(ZooMlp()), os.path.join(here, "scripted_zoo_mlp.pt"))


# An MLP with an nn.Dropout as the recorder saves it: a mask site (python/pathkernel_record.py,
# _StepMaskDropout) whose masks pathkernel sets for a step's training forward.
sys.path.insert(0, os.path.join(here, "..", "..", "python"))
from pathkernel_record import _with_mask_sites  # noqa: E402
dropout_mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 6), torch.nn.Tanh(), torch.nn.Dropout(0.25),
                                  torch.nn.Linear(6, 4))
torch.jit.save(torch.jit.script(_with_mask_sites(dropout_mlp, ["3"])), os.path.join(here, "scripted_dropout_mlp.pt"))


# examples/record_custom.py's LSTM over an 8x8 image's rows (5 hidden units, 3 outputs) and its
# ViT at width 8 with 2 heads (28x28 inputs, 3 outputs): unsafe_split's and attention's tangents.
torch.manual_seed(1)
torch.jit.save(torch.jit.script(RowLstm(hidden=5, outputs=3, width=8)), os.path.join(here, "scripted_lstm.pt"))
torch.jit.save(torch.jit.script(SmallVit(dim=8, heads=2, outputs=3)), os.path.join(here, "scripted_vit.pt"))


# A CNN with GroupNorm for 1x8x8 inputs and 3 outputs (tanh and average pooling: smooth, so that
# S can be checked by second differences): group_norm's derivatives of every order (norm_rules.cpp).
torch.manual_seed(2)
gn_cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.Tanh(),
                             torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))
with torch.no_grad():  # GroupNorm starts at weight 1, bias 0: move it so its gradients are generic
    gn_cnn[1].weight.uniform_(0.5, 1.5)
    gn_cnn[1].bias.uniform_(-0.5, 0.5)
torch.jit.save(torch.jit.script(gn_cnn), os.path.join(here, "scripted_gncnn.pt"))
