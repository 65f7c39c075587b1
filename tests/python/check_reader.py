"""Checks python/pathkernel_read.py against the files it reads, parsed here another way (pandas'
own CSV reader, numpy's .npy reader, the summary's JSON), for one analysis and one explanation.

    python3 tests/python/check_reader.py ANALYSIS EXPLANATION
Exits 1 naming the first difference.
"""
import json
import os
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
import pathkernel_read as pk  # noqa: E402

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)


def main(analysis, explanation):
    a = pk.read_analysis(analysis)
    probes = pd.read_csv(os.path.join(analysis, "probes.csv"), float_precision="round_trip")
    steps = pd.read_csv(os.path.join(analysis, "steps.csv"), float_precision="round_trip")
    summary = json.load(open(os.path.join(analysis, "summary.json")))
    # Coordinates: the arrays' axes against the tables.
    check(np.array_equal(a.step, steps["step"].to_numpy()), "analysis: step coordinates")
    check(len(a.step) == summary["steps_analyzed"], "analysis: number of steps")
    first = probes.drop_duplicates("probe")
    check(np.array_equal(a.probe, first["probe"].to_numpy()), "analysis: probe coordinates")
    check(np.array_equal(a.label, first["label"].to_numpy()), "analysis: labels")
    check(np.array_equal(a.output.reshape(-1), probes["output"].to_numpy()), "analysis: outputs")
    # The coordinate arrays analyze writes beside the quantities agree with the tables.
    arrays = os.path.join(analysis, "arrays")
    check(np.array_equal(np.load(os.path.join(arrays, "step.npy")), steps["step"].to_numpy()), "analysis: step.npy")
    check(np.array_equal(np.load(os.path.join(arrays, "probe.npy")), first["probe"].to_numpy()), "analysis: probe.npy")
    check(np.array_equal(np.load(os.path.join(arrays, "label.npy")), first["label"].to_numpy()), "analysis: label.npy")
    # Values: every array as stored, and the summed D against probes.csv's f_final - f_initial.
    for name in a.names:
        check(np.array_equal(a[name], np.load(os.path.join(analysis, "arrays", name + ".npy")), equal_nan=True),
              "analysis: " + name)
    change = (probes["f_final"] - probes["f_initial"]).to_numpy().reshape(a.output.shape)
    check(np.allclose(a["D"].sum(0), change, rtol=1e-12, atol=1e-12), "analysis: sum of D vs probes.csv")
    for col in steps.columns:
        mine, theirs = a.steps[col], steps[col].to_numpy()
        check(mine.dtype.kind in "if" and np.array_equal(mine.astype(float), theirs.astype(float), equal_nan=True),
              "analysis: steps.csv column " + col)
    check(a.steps["in_Tc"].dtype == np.int64 and a.steps["r"].dtype == np.float64, "analysis: column types")
    # Stable types in the files themselves: pandas' inference must find every float column a float
    # column (a column of zeros written as "0" reads as integers; empty columns read as float NaN).
    for table, frame in (("steps.csv", steps), ("probes.csv", probes)):
        for col in frame.columns:
            want = "i" if col in pk._INT_COLUMNS else "f"
            check(frame[col].dtype.kind == want, "%s: column %s reads as %s" % (table, col, frame[col].dtype))
    df = a.frame("D", "R")
    row = df[(df.step == a.step[-1]) & (df.probe == a.probe[-1]) & (df.output == a.output[-1, -1])]
    check(len(row) == 1 and row["R"].iloc[0] == a["R"][-1, -1, -1], "analysis: frame row lookup")
    check(len(df) == a["D"].size, "analysis: frame size")

    e = pk.read_explanation(explanation)
    attr = pd.read_csv(os.path.join(explanation, "attributions.csv"), float_precision="round_trip")
    es = json.load(open(os.path.join(explanation, "summary.json")))
    check(list(e.probe) == es["probes"], "explanation: probes")
    ef = e.frame()
    check(np.array_equal(ef["probe"].to_numpy(), attr["probe"].to_numpy()), "explanation: probe column")
    check(np.array_equal(ef["output"].to_numpy(), attr["output"].to_numpy()), "explanation: output column")
    check(np.array_equal(ef["example"].to_numpy(), attr["example"].to_numpy()), "explanation: example column")
    check(np.array_equal(ef["example_label"].to_numpy(), attr["label"].to_numpy()), "explanation: example labels")
    check(np.array_equal(ef["times_drawn"].to_numpy(), attr["times_drawn"].to_numpy()), "explanation: times drawn")
    check(np.array_equal(ef["a"].to_numpy(), attr["a"].to_numpy()), "explanation: a (exact round trip)")
    if "a_exact" in attr:
        check(np.array_equal(ef["a_exact"].to_numpy(), attr["a_exact"].to_numpy()), "explanation: a_exact")
    # top.csv's first proponent of each probe is its largest attribution.
    top = e.top_frame()
    for p, probe in enumerate(e.probe):
        best = top[(top.probe == probe) & (top.kind == "proponent") & (top["rank"] == 1)]
        check(len(best) == 1 and best["example"].iloc[0] == int(np.argmax(e.attributions[p])),
              "explanation: top proponent of probe %d" % probe)
    if e.self_influence is not None:
        si = pd.read_csv(os.path.join(explanation, "self_influence.csv"), float_precision="round_trip")
        check(np.array_equal(e.self_influence[si["example"].to_numpy()], si["self_influence"].to_numpy()),
              "explanation: self-influence")
    for f in failures:
        print("MISMATCH:", f)
    print("checked %d analysis arrays, %d attribution rows: %s" % (
        len(a.names), len(ef), "ok" if not failures else "%d mismatches" % len(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
