#!/usr/bin/env python3
"""Checks that lib/'s stages depend one way (issue 24):

    io <- train <- trajectory <- analysis <- explain, report <- cli

Each source and header of lib/src and lib/include/pathkernel belongs to one stage (STAGES
below; a new file must be added there). A file may include the headers of its own stage and of
the stages below it; explain and report are peers and include neither each other. The models/
library sits below them all. Exit status 1 with each offending include named, 2 for a file that
belongs to no stage.

    python3 scripts/check_layers.py [ROOT]     (default: the repository)
    python3 scripts/check_layers.py --self-test
"""
import os
import re
import sys
import tempfile

RANK = {"io": 0, "train": 1, "trajectory": 2, "analysis": 3, "explain": 4, "report": 4, "cli": 5}
STAGES = {
    "io": "data_source errors fs_util idx npy zip_archive pickle csv sha256 run_dir blas_core threads gnuplot version",
    "train": "optimizer train_config sampler lr_schedule stepper per_example checkpoint run_context trainer",
    "trajectory": "replay recorded_run scripted_model trajectory class_names",
    "analysis": "analyzer analysis_rules analysis_report step_terms step_verification update_terms kernels "
                "exact_kernel kinks sharpness projection shards",
    "explain": "explain explain_shards attribution influence",
    "report": "report report_parts sweep",
    "cli": "settings",
}
STAGE_OF = {name: stage for stage, names in STAGES.items() for name in names.split()}
INCLUDE = re.compile(r'^\s*#\s*include\s+"(?:pathkernel/)?([a-z_]+)\.h(?:\.in)?"', re.M)


def check(root):
    files = []
    for sub in ("lib/src", "lib/include/pathkernel"):
        d = os.path.join(root, sub)
        files += [os.path.join(d, f) for f in sorted(os.listdir(d)) if re.search(r"\.(cpp|h|h\.in)$", f)]
    problems, unknown = [], []
    for path in files:
        name = re.sub(r"\.(cpp|h|h\.in)$", "", os.path.basename(path))
        stage = STAGE_OF.get(name)
        if stage is None:
            unknown.append(os.path.relpath(path, root))
            continue
        for dep in INCLUDE.findall(open(path, encoding="utf-8").read()):
            other = STAGE_OF.get(dep)
            if other is None or other == stage:
                continue  # models/, or the same stage
            if RANK[other] > RANK[stage] or (RANK[other] == RANK[stage]):
                problems.append("%s (%s) includes %s.h (%s)" % (os.path.relpath(path, root), stage, dep, other))
    for u in unknown:
        print("%s: in no stage: add it to STAGES in scripts/check_layers.py" % u)
    for p in problems:
        print("against the layering: " + p)
    if unknown:
        return 2
    return 1 if problems else 0


def self_test():
    """A tree with an io file that includes an analysis header must fail; without it, pass."""
    with tempfile.TemporaryDirectory() as t:
        for sub in ("lib/src", "lib/include/pathkernel"):
            os.makedirs(os.path.join(t, sub))
        w = lambda p, s: open(os.path.join(t, p), "w").write(s)
        w("lib/include/pathkernel/analyzer.h", '#include "pathkernel/npy.h"\n')
        w("lib/src/npy.cpp", '#include "pathkernel/npy.h"\n')
        w("lib/include/pathkernel/npy.h", "")
        clean = check(t)
        w("lib/src/npy.cpp", '#include "pathkernel/npy.h"\n#include "pathkernel/analyzer.h"\n')
        upward = check(t)
        w("lib/src/explain.cpp", '#include "pathkernel/report.h"\n')
        w("lib/include/pathkernel/report.h", "")
        w("lib/src/npy.cpp", '#include "pathkernel/npy.h"\n')
        peers = check(t)
        w("lib/src/newfile.cpp", "")
        stray = check(t)
    ok = clean == 0 and upward == 1 and peers == 1 and stray == 2
    print("self-test: %s (clean %d, upward %d, peers %d, unassigned %d)" % ("ok" if ok else "FAILED", clean, upward,
                                                                           peers, stray))
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        sys.exit(self_test())
    sys.exit(check(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
