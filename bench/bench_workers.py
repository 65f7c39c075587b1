#!/usr/bin/python3
"""analyze --workers N against one process on the default job (issue 25, item 4): trains
mlp:128:tanh for one epoch of Fashion-MNIST (938 steps, batch 64, as scripts/default_job.sh), then
times `analyze --probes 64 --second-order` with 1 worker and with each N of --workers, the
commands alternating, wall time from start to exit (start-up and joining included); checks that
every output file but summary.json's timings is the same byte for byte.

--command explain times `explain --probes P` (--probes, default 16) instead; with --momentum M
the run is trained with SGD + momentum M (lr 0.05), which explain attributes through the
optimizer's recursion: each worker then attributes some of the probes over the whole run and
analyzes a stretch of the steps for all of them, and attributions.npy is compared to one
process's to 1e-12 of its largest (and reported bit for bit when it is); without momentum the
workers take even stretches of the steps, compared the same way.

--command merge (needs --momentum) explains the run in --parts N shards (`explain --shard I/N`,
once, untimed) and times what follows them, the two ways alternating: `merge` walking every
part but the last again for the later parts' share, one after another, against `merge --walk K`
for K = 1 .. N-1, --workers of them at a time, then the `merge` that takes their stored shares;
attributions.npy of the two must be equal bit for bit.

usage: /usr/bin/python3 bench/bench_workers.py [--pathkernel build/apps/pathkernel] [--workers 2]
       [--repeats 5] [--data /usr/share/datasets/fashion-mnist] [--command analyze|explain|merge]
       [--momentum M] [--probes P] [--parts N]
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
    """The parts' products and sums may round differently: a_i to 1e-12 of the largest."""
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


def run_at_once(argvs, at_once):
    """Runs the commands, at most at_once at a time; the wall time of all of them."""
    t = time.perf_counter()
    pending = list(argvs)
    running = []
    while pending or running:
        while pending and len(running) < at_once:
            argv = pending.pop(0)
            running.append((argv, subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        argv, p = running.pop(0)
        err = p.communicate()[1]
        if p.returncode != 0:
            sys.exit("failed (%d): %s\n%s" % (p.returncode, " ".join(argv), err.decode()[-2000:]))
    return time.perf_counter() - t


def bench_merge(a, tmp, rundir, probes):
    """--command merge: the shards' merge walking the parts itself against walks ahead at once."""
    shards = []
    for i in range(1, a.parts + 1):
        shards.append(os.path.join(tmp, "shard%d" % i))
        run([a.pathkernel, "explain", rundir, "--probes", str(probes), "--grids", "0", "--shard",
             "%d/%d" % (i, a.parts), "--out", shards[-1]])
    at_once = int(a.workers.split(",")[0])
    serial, ahead, walks = [], [], []
    for r in range(a.repeats):
        for sh in shards:
            for f in ("later_share.npy", "later_share.json"):
                if os.path.exists(os.path.join(sh, f)):
                    os.remove(os.path.join(sh, f))
        serial.append(run([a.pathkernel, "merge"] + shards + ["--out", os.path.join(tmp, "serial"), "--force"]))
        walks.append(run_at_once([[a.pathkernel, "merge"] + shards + ["--walk", str(k)] for k in range(1, a.parts)],
                                 at_once))
        ahead.append(walks[-1] + run([a.pathkernel, "merge"] + shards + ["--out", os.path.join(tmp, "ahead"), "--force"]))
        print("repeat %d of %d: merge walking %.2f s, walks ahead %.2f s + merge %.2f s" %
              (r + 1, a.repeats, serial[-1], walks[-1], ahead[-1] - walks[-1]), file=sys.stderr)
    import numpy as np
    same = (np.load(os.path.join(tmp, "serial", "attributions.npy")) ==
            np.load(os.path.join(tmp, "ahead", "attributions.npy"))).all()
    return serial, ahead, walks, at_once, "attributions %s" % ("bit for bit the same" if same else "DIFFER")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pathkernel", default=os.path.join(ROOT, "build", "apps", "pathkernel"))
    ap.add_argument("--workers", default="2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--command", choices=("analyze", "explain", "merge"), default="analyze")
    ap.add_argument("--parts", type=int, default=4, help="--command merge: explain --shard I/N with N parts")
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
        if a.command == "merge":
            if not a.momentum or a.parts < 2:
                sys.exit("--command merge needs --momentum M and --parts N >= 2 (plain SGD has nothing to walk)")
            serial, ahead, walks, at_once, same = bench_merge(a, tmp, rundir, probes)
            manifest = json.load(open(os.path.join(rundir, "manifest.json")))
            steps = sum(1 for _ in open(os.path.join(rundir, "steps.jsonl")))
            print("bench_workers: merge of explain --shard I/%d of mlp:128:tanh, %d steps, momentum %g, %d probes, "
                  "%d core(s), openblas core %s, median of %d" % (a.parts, steps, a.momentum, probes, os.cpu_count(),
                                                                  blas_core(manifest), a.repeats))
            one, m = statistics.median(serial), statistics.median(ahead)
            print("  merge walking the %d parts itself: %6.2f s wall" % (a.parts - 1, one))
            print("  merge --walk K, %d at a time (%.2f s), then merge: %6.2f s wall  x%.2f  %s" %
                  (at_once, statistics.median(walks), m, one / m, same))
            return
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
            if n > 1 and a.command == "explain":
                line += "  " + close_attributions(os.path.join(tmp, "an1"), os.path.join(tmp, "an%d" % n))
            elif n > 1:
                differ = same_outputs(os.path.join(tmp, "an1"), os.path.join(tmp, "an%d" % n))
                line += "  outputs " + ("identical" if not differ else "DIFFER: " + ", ".join(differ))
            print(line)


if __name__ == "__main__":
    main()
