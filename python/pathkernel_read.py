"""Read pathkernel's analyses and explanations into numpy arrays with their coordinates.

    import pathkernel_read as pk
    a = pk.read_analysis("runs/first-analysis")
    a.step, a.probe, a.label, a.output     # coordinates: [S], [P], [P], [P, C]
    a["R"]                                 # float64 [S, P, C], as arrays/R.npy
    a.steps["r"]                           # a column of steps.csv (numpy, typed by name)
    a.frame("R")                           # long DataFrame: step, probe, label, output, R (pandas)
    e = pk.read_explanation("runs/first-explain")
    e.attributions, e.probe, e.output, e.example_label

Needs numpy; pandas only for the DataFrame methods. The formats are in docs/analysis-format.md.
Every CSV column gets one type by its name (integers for indices and flags, float64 for the
rest, empty cells NaN), whatever the values in one file look like.
"""
import csv
import json
import os

import numpy as np

# Columns that hold whole numbers; every other column is read as float64.
_INT_COLUMNS = {"step", "probe", "label", "output", "loss_went_up", "in_Tc", "example", "rank", "times_drawn"}
_TEXT_COLUMNS = {"kind", "steps"}
# arrays/*.npy that are coordinates of the others' axes, not quantities.
_COORDINATES = {"outputs", "step", "probe", "label"}


def _pandas():
    try:
        import pandas
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError("this method needs pandas (Debian: apt-get install python3-pandas)") from e
    return pandas


def _read_csv(path):
    """A CSV file as {column: numpy array}, typed by column name."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError("%s: empty" % path)
    header, body = rows[0], rows[1:]
    if len(set(header)) != len(header):
        raise ValueError("%s: repeated column names" % path)
    out = {}
    for i, name in enumerate(header):
        cells = []
        for n, row in enumerate(body, start=2):
            if len(row) != len(header):
                raise ValueError("%s:%d: %d cells, the header has %d" % (path, n, len(row), len(header)))
            cells.append(row[i])
        if name in _TEXT_COLUMNS:
            out[name] = np.array(cells, dtype=object)
        elif name in _INT_COLUMNS:
            out[name] = np.array([int(c) for c in cells], dtype=np.int64)
        else:
            out[name] = np.array([float(c) if c != "" else np.nan for c in cells], dtype=np.float64)
    return out


class Analysis:
    """An analysis folder (pathkernel analyze). Arrays are [steps, probes, outputs]."""

    def __init__(self, path):
        self.path = path
        with open(os.path.join(path, "summary.json")) as f:
            self.summary = json.load(f)
        self.steps = _read_csv(os.path.join(path, "steps.csv"))
        self.probes = _read_csv(os.path.join(path, "probes.csv"))
        self.step = self.steps["step"]
        self.output = np.load(os.path.join(path, "arrays", "outputs.npy"))
        # probes.csv has one row per (probe, output), probes in the arrays' order.
        n_out = self.output.shape[1]
        self.probe = self.probes["probe"][::n_out].copy()
        self.label = self.probes["label"][::n_out].copy()
        self.names = sorted(f[:-4] for f in os.listdir(os.path.join(path, "arrays"))
                            if f.endswith(".npy") and f[:-4] not in _COORDINATES)
        self._arrays = {}

    def __getitem__(self, name):
        """arrays/NAME.npy, float64 [steps, probes, outputs] (read on first use)."""
        if name not in self.names:
            raise KeyError("%s: no array %s (has %s)" % (self.path, name, ", ".join(self.names)))
        if name not in self._arrays:
            a = np.load(os.path.join(self.path, "arrays", name + ".npy"))
            if a.shape != (len(self.step), len(self.probe), self.output.shape[1]):
                raise ValueError("%s: %s has shape %s, the tables say %s" % (
                    self.path, name, a.shape, (len(self.step), len(self.probe), self.output.shape[1])))
            self._arrays[name] = a
        return self._arrays[name]

    def frame(self, *names):
        """A long pandas DataFrame: one row per (step, probe, output) with the arrays `names`
        (default: all) as columns, and the coordinates step, probe, label, output."""
        pd = _pandas()
        names = names or tuple(self.names)
        s, p, c = len(self.step), len(self.probe), self.output.shape[1]
        cols = {
            "step": np.repeat(self.step, p * c),
            "probe": np.tile(np.repeat(self.probe, c), s),
            "label": np.tile(np.repeat(self.label, c), s),
            "output": np.tile(self.output.reshape(-1), s),
        }
        for n in names:
            cols[n] = self[n].reshape(-1)
        return pd.DataFrame(cols)

    def steps_frame(self):
        """steps.csv as a pandas DataFrame (typed as the numpy columns)."""
        return _pandas().DataFrame(self.steps)

    def probes_frame(self):
        """probes.csv as a pandas DataFrame."""
        return _pandas().DataFrame(self.probes)


class Explanation:
    """An explanation folder (pathkernel explain). attributions is [probes, training examples]."""

    def __init__(self, path):
        self.path = path
        with open(os.path.join(path, "summary.json")) as f:
            self.summary = json.load(f)
        per = self.summary["per_probe"]
        self.probe = np.array([r["probe"] for r in per], dtype=np.int64)
        self.label = np.array([r["label"] for r in per], dtype=np.int64)
        self.output = np.array([r["output"] for r in per], dtype=np.int64)
        self.attributions = np.load(os.path.join(path, "attributions.npy"))
        exact = os.path.join(path, "attributions_exact.npy")
        self.attributions_exact = np.load(exact) if os.path.exists(exact) else None
        self.example_label = np.load(os.path.join(path, "example_labels.npy"))
        self.times_drawn = np.load(os.path.join(path, "times_drawn.npy"))
        self.example = np.arange(self.attributions.shape[1], dtype=np.int64)
        if self.attributions.shape != (len(self.probe), len(self.example_label)):
            raise ValueError("%s: attributions.npy has shape %s, the summary and labels say %s" % (
                path, self.attributions.shape, (len(self.probe), len(self.example_label))))
        self.top = _read_csv(os.path.join(path, "top.csv"))
        si = os.path.join(path, "self_influence.npy")
        self.self_influence = np.load(si) if os.path.exists(si) else None

    def frame(self):
        """A long pandas DataFrame: one row per (probe, training example) with probe, label,
        output, example, example_label, times_drawn, a (and a_exact with --exact)."""
        pd = _pandas()
        p, n = self.attributions.shape
        cols = {
            "probe": np.repeat(self.probe, n),
            "label": np.repeat(self.label, n),
            "output": np.repeat(self.output, n),
            "example": np.tile(self.example, p),
            "example_label": np.tile(self.example_label, p),
            "times_drawn": np.tile(self.times_drawn, p),
            "a": self.attributions.reshape(-1),
        }
        if self.attributions_exact is not None:
            cols["a_exact"] = self.attributions_exact.reshape(-1)
        return pd.DataFrame(cols)

    def top_frame(self):
        """top.csv (proponents and opponents per probe) as a pandas DataFrame."""
        return _pandas().DataFrame(self.top)


def read_analysis(path):
    """Reads an analysis folder; see Analysis."""
    return Analysis(path)


def read_explanation(path):
    """Reads an explanation folder; see Explanation."""
    return Explanation(path)
