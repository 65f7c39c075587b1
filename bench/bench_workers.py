#!/usr/bin/python3
"""analyze --workers N against one process on the default job (issue 25, item 4): trains
mlp:128:tanh for one epoch of Fashion-MNIST (938 steps, batch 64, as scripts/default_job.sh), then
times `analyze --probes 64 --second-order` with 1 worker and with each N of --workers, the
commands alternating, wall time from start to exit (start-up and joining included); checks that
every output file but summary.json's timings is the same byte for byte.

--command explain times `explain --probes P` (--probes, default 16) instead; with --momentum M
the run is trained with SGD + momentum M (lr 0.05), which explain attributes through the
optimizer's recursion: each worker then explains some of the probes over the whole run, and
attributions.npy is compared to one process's to 1e-12 of its largest.

usage: /usr/bin/python3 bench/bench_workers.py [--pathkernel build/apps/pathkernel] [--workers 2]
       [--repeats 5] [--data /usr/share/datasets/fashion-mnist] [--command analyze|explain]
       [--momentum M] [--probes P]
"""
import argparse
import filecmp
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv):
    t = time.perf_counter()
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if p.returncode != 0:
        sys.exit("failed (%d): %s\n%s" % (p.returncode, " ".join(argv), p.stderr.decode()[-2000:]))
    return time.perf_counter() - t


def same_outputs(a, b):
    """Every file of analysis a equals b's; summary.json but for timings and the path of its run."""
    differ = []
    for root, _, files in os.walk(a):
        for f in files:
            pa = os.path.join(root, f)
            pb = os.path.join(b, os.path.relpath(pa, a))
            if f == "summary.json":
                ja, jb = json.load(open(pa)), json.load(open(pb))
                for j in (ja, jb):
                    for k in ("seconds", "seconds_per_step", "startup_seconds", "created_unix"):
                        j.pop(k, None)
                    j.get("settings", {}).pop("workers", None)
                if ja != jb:
                    differ.append(f)
            elif not os.path.exists(pb) or not filecmp.cmp(pa, pb, shallow=False):
                differ.append(os.path.relpath(pa, a))
    return differ


def close_attributions(a, b):
    """Through the optimizer the parts are summed in another order: a_i to 1e-12 of the largest."""
    import numpy as np
    x = np.load(os.path.join(a, "attributions.npy"))
    y = np.load(os.path.join(b, "attributions.npy"))
    if x.shape != y.shape:
        return "attributions DIFFER in shape: %s against %s" % (y.shape, x.shape)
    err = float(np.abs(x - y).max() / np.abs(x).max())
    same = "bit for bit" if (x == y).all() else "max relative difference %.1e" % err
    return "attributions %s one process's (%s)" % ("equal to" if err <= 1e-12 else "DIFFER from", same)


def blas_core(manifest):
    """The OpenBLAS kernel set the run recorded (the manifest names it)."""
    return str(manifest.get("threads", {}).get("blas_core", "unknown"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pathkernel", default=os.path.join(ROOT, "build", "apps", "pathkernel"))
    ap.add_argument("--workers", default="2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--command", choices=("analyze", "explain"), default="analyze")
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--probes", type=int, help="default: 64 (analyze), 16 (explain)")
    a = ap.parse_args()
    counts = [1] + [int(n) for n in a.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_workers.") as tmp:
        rundir = os.path.join(tmp, "run")
        train = [a.pathkernel, "train", "--data", a.data, "--model", "mlp:128:tanh", "--epochs", "1", "--batch", "64",
                 "--eval-every", "200", "--out", rundir]
        train += ["--lr", "0.05", "--momentum", str(a.momentum)] if a.momentum else ["--lr", "0.1"]
        run(train)
        probes = a.probes or (64 if a.command == "analyze" else 16)
        job = ["analyze", rundir, "--probes", str(probes), "--second-order"] if a.command == "analyze" else \
            ["explain", rundir, "--probes", str(probes), "--grids", "0"]
        times = {n: [] for n in counts}
        for r in range(a.repeats):
            for n in counts:
                out = os.path.join(tmp, "an%d" % n)
                times[n].append(run([a.pathkernel] + job + ["--workers", str(n), "--out", out, "--force"]))
            print("repeat %d of %d: %s" % (r + 1, a.repeats, "  ".join("%d: %.2f s" % (n, times[n][-1]) for n in counts)),
                  file=sys.stderr)
        manifest = json.load(open(os.path.join(rundir, "manifest.json")))
        steps = sum(1 for _ in open(os.path.join(rundir, "steps.jsonl")))
        what = "%d probes x 10, --second-order" % probes if a.command == "analyze" else "%d probes" % probes
        print("bench_workers: %s of mlp:128:tanh, %d steps, %s, %s, %d core(s), openblas core %s, median of %d" %
              (a.command, steps, "momentum %g" % a.momentum if a.momentum else "plain SGD", what, os.cpu_count(),
               blas_core(manifest), a.repeats))
        one = statistics.median(times[1])
        for n in counts:
            m = statistics.median(times[n])
            line = "  --workers %d: %6.2f s wall  x%.2f" % (n, m, one / m)
            if n > 1 and a.command == "explain" and a.momentum:
                line += "  " + close_attributions(os.path.join(tmp, "an1"), os.path.join(tmp, "an%d" % n))
            elif n > 1:
                differ = same_outputs(os.path.join(tmp, "an1"), os.path.join(tmp, "an%d" % n))
                line += "  outputs " + ("identical" if not differ else "DIFFER: " + ", ".join(differ))
            print(line)


if __name__ == "__main__":
    main()
