#!/usr/bin/env python3
"""The Findings table of scripts/findings_note.sh, in Markdown, from the runs' files.

usage: findings_note_table.py DIR     (DIR/MODEL/REGIME-xFACTOR-wdWD/{run,analysis} for each run)
"""
import csv
import json
import os
import statistics
import sys


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def num(v):
    return float(v) if v not in ("", None) else None


def main():
    root = sys.argv[1]
    print("| model | regime | lr (x 2/lambda_0) | wd | median r | share of sum \\|R\\| in T_c: tau / outlier "
          "| \\|sum R\\| / \\|change\\| | lr lambda_max: start, max, end | loss up: batch / subset "
          "| kinks per step and example: probes / batch | median cos(g_k, g_k-1) | test acc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and "lambda0" not in d):
        for name in sorted(os.listdir(os.path.join(root, model)), key=lambda n: (n.split("-")[0], float(n.split("-x")[1].split("-")[0]), n)):
            d = os.path.join(root, model, name)
            regime, rest = name.split("-x")
            factor, wd = rest.split("-wd")
            if os.path.exists(os.path.join(d, "diverged")):
                lr = open(os.path.join(d, "diverged")).read().split()[1]
                print(f"| {model} | {regime} | {lr} (x{factor}) | {wd} | diverged (exit 3) | | | | | | | |")
                continue
            an = json.load(open(os.path.join(d, "analysis", "summary.json")))
            run = json.load(open(os.path.join(d, "run", "summary.json")))
            st = rows(os.path.join(d, "analysis", "steps.csv"))
            pr = rows(os.path.join(d, "analysis", "probes.csv"))
            lr = float(st[0]["lr"])
            r = statistics.median(float(s["r"]) for s in st)
            by = an["tc_by_rule"]
            # |sum R| against |f_N - f_0| over probes and outputs (norms)
            sr = sum((float(p["sum_R_Tc"]) + float(p["sum_R_other"])) ** 2 for p in pr) ** 0.5
            ch = sum((float(p["f_final"]) - float(p["f_initial"])) ** 2 for p in pr) ** 0.5
            sh = [s for s in st if s.get("lambda_max_train")]
            ll = [lr * float(s["lambda_max_train"]) for s in sh]
            up_b = sum(int(s["loss_went_up"]) for s in st) / len(st)
            up_s = [float(s["subset_loss_after"]) > float(s["subset_loss_before"]) for s in sh]
            # Kinks per step per example walked (the probes; the batch, or its first
            # kinks_examples), over the steps walked; steps not walked (--kinks-max) counted.
            man = json.load(open(os.path.join(d, "run", "manifest.json")))
            settings = an["settings"]
            cap = settings.get("kinks_examples", 0)
            walked = min(cap, man["batch"]) if cap else man["batch"]
            kp = [num(s.get("kinks_probes")) for s in st]
            kb = [num(s.get("kinks_batch")) for s in st]
            kp_w = [v for v in kp if v is not None]
            kb_w = [v for v in kb if v is not None]
            kinks = "-"
            if settings.get("kinks") and kp_w:
                kinks = "%.1f / %.1f" % (statistics.mean(kp_w) / settings["probes"], statistics.mean(kb_w) / walked)
                if len(kp_w) < len(st):
                    kinks += " (%d steps not walked)" % (len(st) - len(kp_w))
            elif settings.get("kinks"):
                kinks = "- (no step walked)"
            acc = run.get("test_accuracy")
            cos = statistics.median(float(s["grad_cos_prev"]) for s in st if s["grad_cos_prev"])
            print(f"| {model} | {regime} | {lr:.4g} (x{factor}) | {wd} | {r:.3g} | "
                  f"{by['tau']['share_of_R_norm_in_tc']:.2f} ({by['tau']['tc_size']} steps) / "
                  f"{by['outlier']['share_of_R_norm_in_tc']:.2f} ({by['outlier']['tc_size']}) | {sr / ch:.3g} | "
                  f"{ll[0]:.2f}, {max(ll):.2f}, {ll[-1]:.2f} | {up_b:.2f} / {sum(up_s) / len(up_s):.2f} | {kinks} | {cos:.2f} | "
                  f"{acc if acc is None else '%.3f' % acc} |")


if __name__ == "__main__":
    main()
