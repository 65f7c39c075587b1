#!/usr/bin/env python3
"""The Findings table of scripts/findings_optimizers.sh, in Markdown, from the runs' files.

usage: findings_table.py DIR NAME...   (DIR/NAME/{run,analysis,explain} for each NAME)
"""
import json
import os
import sys


def load(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def main():
    root, names = sys.argv[1], sys.argv[2:]
    print("| run | optimizer, lr | test acc | left unexplained by sum_i a_i: first order / exact "
          "| max \\|rounding + decay\\| / \\|change\\| | \\|sum R\\| / \\|change\\| | median r | max r "
          "| T_c tau: steps, share of \\|R\\| | T_c outlier: steps, share |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        run = load(root, name, "run", "summary.json")
        man = load(root, name, "run", "manifest.json")
        an = load(root, name, "analysis", "summary.json")
        ex = load(root, name, "explain", "summary.json")
        opt = man["optimizer"]
        desc = opt["name"]
        if opt.get("momentum"):
            desc += " mu %g" % opt["momentum"]
        if opt.get("nesterov"):
            desc += " Nesterov"
        if opt.get("weight_decay"):
            desc += " wd %g" % opt["weight_decay"]
        desc += ", %g" % opt["lr"]
        per = ex["per_probe"]
        change = sum(abs(p["f_final"] - p["f_initial"]) for p in per)
        # The share of the change of the 16 explained logits that sum_i a_i leaves unexplained:
        # sum_p |change_p - sum_i a_i(x_p)| / sum_p |change_p|.
        first = sum(abs(p["f_final"] - p["f_initial"] - p["sum_a"]) for p in per) / change
        exact = sum(abs(p["f_final"] - p["f_initial"] - p["sum_a_exact"]) for p in per) / change
        rest = max(abs(p["sum_u"]) / abs(p["f_final"] - p["f_initial"]) for p in per)
        pct = an["r_percentiles"]
        tau, outl = an["tc_by_rule"]["tau"], an["tc_by_rule"]["outlier"]
        n = an["steps_analyzed"]
        print("| %s | %s | %.4f | %.1f%% / %.1e | %.1e | %.2f | %.3g | %.3g | %d (%.1f%%), %.1f%% | %d (%.1f%%), %.1f%% |" % (
            name, desc, run["test_accuracy"], 100 * first, exact, rest, an["sum_R_over_change"],
            pct["p50"], pct["max"], tau["tc_size"], 100 * tau["tc_size"] / n, 100 * tau["share_of_R_norm_in_tc"],
            outl["tc_size"], 100 * outl["tc_size"] / n, 100 * outl["share_of_R_norm_in_tc"]))


if __name__ == "__main__":
    main()
