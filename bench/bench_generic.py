#!/usr/bin/python3
"""Issue 25's benchmark: pathkernel's generic route (a recorded model's own TorchScript file) next
to functorch on the same models, in one run, one thread, float64.

For each model (examples/record_custom.py: a 77k-parameter residual CNN, a small ViT, pytorch/
examples mnist's Net and a 235k-parameter MLP) it records a few SGD + momentum steps on
Fashion-MNIST, then measures, each in its own process (time per step and peak memory):

  pathkernel analyze, products by Jacobian-vector products (--products auto) and by gradient
  rows (--products rows, the route before issue 25); for the MLP also its factorized route; the
  marginal time of an analyzed step ((all steps - step 0 alone) / (steps - 1), timed inside
  pathkernel), with what an analysis pays once (its start-up) beside it;
  functorch jvp: J v for all probes along one direction (what each of analyze's directions costs);
  functorch step: what one analyzed step computes, the functorch way: the probes' outputs at
  w_{k+1} and J v along each of the step's directions (dw, the gradient, the momentum buffer, the
  optimizer's kernel direction: 4 for SGD with momentum), one jvp per direction;
  functorch step-vmap: the same with the four directions as one vmap batch of tangents;
  functorch vmap(jacrev): every probe's gradient rows (what explain's per-example split needs);
  pathkernel explain rows (bench/bench_rows.cpp): the same rows as explain forms them on the
  explicit route, one backward per row, one batched backward per probe, functorch's own C++
  transforms over blocks of probes (functorch_rows.h), and the mode it chooses;
  pathkernel step products (bench_rows too): the four directions' J v as analyze forms them, one
  forward per direction (each) and all four in one forward (batched);
  the multiply-adds of each (counted on the model's Conv2d and Linear modules, for the models all
  of whose products are in them): a forward of the probes M, one jvp 3M - M1 (a layer's tangent
  is two products, J's input tangent times W and the input times the weight's tangent, the first
  layer M1 only the second), four directions M + 4(2M - M1), and what functorch step computes
  (the four and a forward at w_{k+1}): the least work an analyzed step can do, against one jvp's.

functorch runs with glibc's allocator set as pathkernel sets it (tune_allocator), after two
warm-up calls, best of three. Each figure is the median over --repeats; the processes alternate. Prints a table and, with
--json FILE, writes the figures.

usage: /usr/bin/python3 bench/bench_generic.py [--pathkernel build/apps/pathkernel] [--probes 64]
       [--steps 6] [--repeats 3] [--models rescnn77k,vit,mnistnet,mlp235k] [--json FILE]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROBES_OF = {"mnistnet": 8}  # the figure for the 1.2M-parameter Net was at 8 probes


def child(argv, may_fail=False):
    """Runs argv to its end with its own rusage: (stdout, peak RSS in MiB); with may_fail, a
    failure gives (None, 0) instead of ending the benchmark."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        # One thread everywhere: Debian's torch multiplies through OpenBLAS, which ignores
        # torch.set_num_threads (pathkernel pins it itself).
        os.execve(argv[0], argv, dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1"))
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        if may_fail:
            return None, 0.0
        sys.exit("failed (%d): %s" % (os.waitstatus_to_exitcode(status), " ".join(argv)))
    return b"".join(chunks).decode(), usage.ru_maxrss / 1024.0


def analyze(pk, run, out, probes, steps, extra):
    """Seconds per analyzed step as the marginal cost of a step: (time of the whole analysis - time
    of an analysis of step 0 alone) / (steps - 1), each timed inside pathkernel from the run's
    opening to the end. What every step pays (its terms, its recorded step's verification) is
    counted; what an analysis pays once (choosing the route and the probes, checking the modes
    of J v on the probes, the first step's per-example split check) is not, and is returned as
    the start-up: the one-step analysis less one marginal step."""
    def once(rng):
        argv = [pk, "analyze", run, "--probes", str(probes), "--check-every", "1000000", "--threads", "1",
                "--out", out, "--force", "--range", rng] + extra
        _, rss = child(argv)
        with open(os.path.join(out, "summary.json")) as f:
            return json.load(f), rss
    one, _ = once("0:1")
    s, rss = once("0:%d" % steps)
    per_step = (s["seconds"] - one["seconds"]) / (steps - 1)
    return per_step, one["seconds"] - per_step, rss, s.get("products_used", ""), s.get("kernel_route_used", "")


def rows_measure(bench_rows, run, probes):
    """In a child: explain's probe rows by pathkernel (bench_rows): {way: (seconds, why)}; S's
    ways (bench_rows' s-*) are not this benchmark's."""
    out, rss = child([bench_rows, run, str(probes), "2", "per-row,batched,functorch,jvp-each,jvp-batched,chosen"])
    ways = {}
    for line in out.splitlines()[1:]:
        name, rest = line.split(None, 1)
        sec, _, why = rest.partition(" ")
        if sec != "unsupported:":
            ways[name] = (float(sec), why)
    return ways, rss


def functorch_measure(kind, run, probes, what):
    """In a child: one functorch measurement (seconds) of `what` on the run's model at step 0;
    None where functorch cannot do it (vmap of jacrev over an LSTM in torch 1.13)."""
    out, rss = child(["/usr/bin/python3", os.path.abspath(__file__), "--functorch", kind, run, str(probes), what],
                     may_fail=True)
    return (float(out.strip().splitlines()[-1]) if out is not None else None), rss


def tune_allocator():
    """glibc's malloc as pathkernel sets it (lib/src/io/threads.cpp, tune_allocator): blocks up to
    256 MiB from the heap and freed memory kept, instead of a fresh mmap per large tensor. Without
    it a convolution's im2col buffer is page-faulted in on every call: on these VMs the residual
    CNN's forward takes 0.55 s instead of 0.075 s, in Python and C++ alike."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (libc.mallopt(M_MMAP_THRESHOLD, 256 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1024 << 20)):
        sys.exit("bench_generic: mallopt refused pathkernel's allocator settings")


def multiply_adds(model, x):
    """{"forward": M, "first": M1} of the model's Conv2d and Linear modules on x, or {} where they
    are not all its products (the profiler's count of the forward's convolutions and matrix
    products, two flops a multiply-add, differs)."""
    import torch
    macs = []

    def hook(m, _, out):
        if isinstance(m, torch.nn.Conv2d):
            macs.append(out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
        elif isinstance(m, torch.nn.Linear):
            macs.append(out.numel() * m.in_features)
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad(), torch.profiler.profile(with_flops=True) as prof:
        model(x)
    for h in handles:
        h.remove()
    flops = sum(e.flops for e in prof.key_averages() if e.key in ("aten::conv2d", "aten::addmm", "aten::mm", "aten::bmm"))
    if not macs or abs(2 * sum(macs) - flops) > 0.01 * flops:
        return {}
    return {"forward": sum(macs), "first": macs[0]}


def functorch_child(kind, run, probes, what):
    tune_allocator()  # the same allocator as pathkernel's: before torch allocates anything
    import numpy as np
    import torch
    import functorch
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from record_custom import build
    torch.set_num_threads(1)
    model, _ = build(kind)
    model = model.double()
    sd = torch.load(os.path.join(run, "checkpoints", "step_%08d.pt" % 0))
    model.load_state_dict({k: v.double() for k, v in sd.items()})
    xt = torch.from_numpy(np.load(os.path.join(run, "data", "test_x.npy"))).double()
    x = xt[:: max(1, xt.shape[0] // probes)][:probes].contiguous()
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    dirs = [{k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()} for _ in range(4)]

    def f(p):
        return torch.nn.utils.stateless.functional_call(model, p, (x,))

    def jvp():
        functorch.jvp(f, (params,), (dirs[0],))

    def step():
        with torch.no_grad():
            f(params)  # the outputs at w_{k+1} (for D)
        for d in dirs:
            functorch.jvp(f, (params,), (d,))

    def step_vmap():  # the four directions as one vmap batch of tangents
        with torch.no_grad():
            f(params)
        stacked = {k: torch.stack([d[k] for d in dirs]) for k in params}
        functorch.vmap(lambda d: functorch.jvp(f, (params,), (d,))[1])(stacked)

    def rows():
        def one(p, xi):
            return torch.nn.utils.stateless.functional_call(model, p, (xi.unsqueeze(0),))[0]
        functorch.vmap(functorch.jacrev(one), in_dims=(None, 0))(params, x)

    if what == "macs":
        print(json.dumps(multiply_adds(model, x)))
        return
    fn = {"jvp": jvp, "step": step, "step-vmap": step_vmap, "rows": rows}[what]
    for _ in range(2):  # warm up (the heap grows to its working size on the first calls)
        fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    print(best)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--functorch":
        functorch_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--pathkernel", default=os.path.join(ROOT, "build", "apps", "pathkernel"))
    ap.add_argument("--bench-rows", default=os.path.join(ROOT, "build", "bench", "bench_rows"))
    ap.add_argument("--probes", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="rescnn77k,vit,mnistnet,mlp235k")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    import torch  # noqa: F401  (only for the BLAS line below)
    core = os.environ.get("OPENBLAS_CORETYPE", "(OpenBLAS's choice)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_generic.") as tmp:
        for kind in a.models.split(","):
            probes = PROBES_OF.get(kind, a.probes)
            run = os.path.join(tmp, kind)
            child(["/usr/bin/python3", os.path.join(ROOT, "examples", "record_custom.py"), run, "--model", kind,
                   "--steps", str(a.steps), "--train-limit", "600"])
            routes = [("pathkernel jvp", ["--products", "auto"]), ("pathkernel rows", ["--products", "rows"])]
            if kind == "mlp235k":
                routes = [("pathkernel factorized", []), ("pathkernel torchscript jvp", ["--kernel-route", "torchscript"]),
                          ("pathkernel torchscript rows", ["--kernel-route", "torchscript", "--products", "rows"])]
            figures = {}
            for rep in range(a.repeats):
                for name, extra in routes:
                    sps, start, rss, products, route = analyze(a.pathkernel, run, os.path.join(tmp, "an"), probes,
                                                               a.steps, extra)
                    figures.setdefault(name, []).append((sps, rss, "%s/%s, start-up %.2f s once" % (route, products, start)))
                ways, rss = rows_measure(a.bench_rows, run, probes)
                for way, (sec, why) in ways.items():
                    label = "pathkernel step products " + way[4:] if way.startswith("jvp-") else "pathkernel explain rows " + way
                    figures.setdefault(label, []).append((sec, rss, why))
                for what in ("jvp", "step", "step-vmap", "rows"):
                    sec, rss = functorch_measure(kind, run, probes, what)
                    if sec is not None:
                        figures.setdefault("functorch " + what, []).append((sec, rss, ""))
                    else:
                        print("%s: functorch %s failed (unsupported)" % (kind, what), file=sys.stderr)
                print("%s: repeat %d of %d done" % (kind, rep + 1, a.repeats), file=sys.stderr)
            results[kind] = {name: {"seconds": statistics.median(v[0] for v in vals),
                                    "peak_rss_mib": statistics.median(v[1] for v in vals),
                                    "route": vals[0][2]}
                             for name, vals in figures.items()}
            results[kind]["probes"] = probes
            out, _ = child(["/usr/bin/python3", os.path.abspath(__file__), "--functorch", kind, run, str(probes), "macs"])
            results[kind]["multiply_adds"] = json.loads(out.strip().splitlines()[-1])
    from ctypes import CDLL, c_char_p
    try:
        ob = CDLL("libopenblas.so.0")
        ob.openblas_get_corename.restype = c_char_p
        core = ob.openblas_get_corename().decode()
    except OSError:
        pass
    print("bench_generic: 1 thread, float64, OpenBLAS core %s, %d steps, median of %d" % (core, a.steps, a.repeats))
    for kind, figs in results.items():
        probes = figs.pop("probes")
        macs = figs.pop("multiply_adds")
        print("\n%s, %d probes x 10 outputs (per analyzed step; functorch per call)" % (kind, probes))
        ref = figs["functorch step"]["seconds"]
        for name, f in figs.items():
            print("  %-34s %8.4f s  x%6.2f of functorch step  peak %7.1f MiB  %s" %
                  (name, f["seconds"], f["seconds"] / ref, f["peak_rss_mib"], f["route"]))
        if "pathkernel explain rows chosen" in figs and "functorch rows" in figs:
            print("  explain's rows / functorch vmap(jacrev): x%.2f" %
                  (figs["pathkernel explain rows chosen"]["seconds"] / figs["functorch rows"]["seconds"]))
        if macs:
            m, m1 = macs["forward"], macs["first"]
            jvp, four = 3 * m - m1, m + 4 * (2 * m - m1)
            print("  multiply-adds: forward %.3g, one jvp %.2f of it, four directions %.2f (x%.2f of one jvp), "
                  "functorch step's work %.2f (x%.2f)" % (m, jvp / m, four / m, four / jvp, (four + m) / m, (four + m) / jvp))
        figs["probes"] = probes
        figs["multiply_adds"] = macs
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"blas_core": core, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
