#!/usr/bin/env python3
"""The Findings table of scripts/findings_train_mode.sh, in Markdown, from the runs' files.

usage: findings_train_mode_table.py DIR NAME...   (DIR/NAME/{run,analysis} for each NAME)

Per run: the test accuracy after training; the per-step residual ratio r = |R|/|F| (median, max);
the complex steps T_c (tau rule) and their share of sum_k |R_k|; |sum R| / |f_N - f_0| and the
share of the change the kernel sum leaves unexplained, sum_p |f_N - f_0 - sum_k K_k| /
sum_p |f_N - f_0| (summed over every probe and output); for BatchNorm, the running statistics'
own change: |sum U_stats| / |f_N - f_0| and the median over steps of |U_stats| / |F|.
"""
import csv
import json
import os
import sys

import numpy as np


def main():
    root, names = sys.argv[1], sys.argv[2:]
    print("| run | model, lr | test acc | median r | max r | T_c: steps, share of sum\\|R\\| "
          "| \\|sum R\\| / \\|change\\| | left unexplained by sum K | \\|sum U_stats\\| / \\|change\\| "
          "| median \\|U_stats\\| / \\|F\\| |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        run, an = os.path.join(root, name, "run"), os.path.join(root, name, "analysis")
        done = json.load(open(os.path.join(run, "COMPLETE")))
        kind = open(os.path.join(run, "..", "model.txt")).read().strip()
        lr = json.loads(open(os.path.join(run, "steps.jsonl")).readline())["lr"]
        steps = list(csv.DictReader(open(os.path.join(an, "steps.csv"))))
        probes = list(csv.DictReader(open(os.path.join(an, "probes.csv"))))
        r = np.array([float(s["r"]) for s in steps])
        tc = np.array([s["in_Tc"] == "1" for s in steps])
        r_norm = np.array([float(s["R_norm"]) for s in steps])
        change = np.array([float(p["f_final"]) - float(p["f_initial"]) for p in probes])
        sum_k = np.array([float(p["sum_K"]) for p in probes])
        sum_r = np.array([float(p["sum_R_Tc"]) + float(p["sum_R_other"]) for p in probes])
        scale = np.abs(change).sum()
        tc_share = r_norm[tc].sum() / max(r_norm.sum(), 1e-300)
        stats = os.path.join(an, "arrays", "U_stats.npy")
        if os.path.exists(stats):
            u = np.load(stats)
            f_norm = np.array([float(s["F_norm"]) for s in steps])
            u_norm = np.array([float(s["U_stats_norm"]) for s in steps])
            bn = "%.3g | %.3g" % (np.abs(u.sum(0)).sum() / scale, np.median(u_norm / np.maximum(f_norm, 1e-300)))
        else:
            bn = "- | -"
        print("| %s | %s, %g | %.4f | %.3g | %.3g | %d (%.1f%%), %.1f%% | %.3g | %.1f%% | %s |" % (
            name, kind, lr, done.get("test_accuracy", float("nan")), np.median(r), r.max(), tc.sum(),
            100 * tc.mean(), 100 * tc_share, np.abs(sum_r).sum() / scale,
            100 * np.abs(change - sum_k).sum() / scale, bn))


if __name__ == "__main__":
    main()
