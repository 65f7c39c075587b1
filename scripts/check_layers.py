#!/usr/bin/env python3
"""Checks that lib/'s stages depend one way (issue 24):

    io <- train <- trajectory <- analysis <- explain, report <- cli

A file's stage is its folder: lib/src/<stage>/ and lib/include/pathkernel/<stage>/ (STAGES
below). A file may include the headers of its own stage and of the stages below it; explain
and report are peers and include neither each other. The models/ library
(pathkernel/models/...) sits below them all. Exit status 1 with each offending include named, 2
for a file outside the stage folders or an include of lib/ that names no stage.

    python3 scripts/check_layers.py [ROOT]     (default: the repository)
    python3 scripts/check_layers.py --self-test
"""
import os
import re
import sys
import tempfile

RANK = {"models": -1, "io": 0, "train": 1, "trajectory": 2, "analysis": 3, "explain": 4, "report": 4, "cli": 5}
STAGES = [s for s in RANK if s != "models"]
ROOTS = ("lib/src", "lib/include/pathkernel")
INCLUDE = re.compile(r'^\s*#\s*include\s+"pathkernel/([^"]+)"', re.M)
SOURCE = re.compile(r"\.(cpp|h|h\.in)$")


def files_of(root):
    """(path relative to root, stage or None) of every source and header under lib/."""
    out = []
    for sub in ROOTS:
        base = os.path.join(root, sub)
        for d, _, names in os.walk(base):
            for f in sorted(names):
                if SOURCE.search(f):
                    rel = os.path.relpath(os.path.join(d, f), base)
                    parts = rel.split(os.sep)
                    stage = parts[0] if len(parts) == 2 and parts[0] in STAGES else None
                    out.append((os.path.join(sub, rel), stage))
    return sorted(out)


def check(root):
    problems, unknown = [], []
    for rel, stage in files_of(root):
        if stage is None:
            unknown.append("%s: in no stage folder (one of %s)" % (rel, ", ".join(STAGES)))
            continue
        for target in INCLUDE.findall(open(os.path.join(root, rel), encoding="utf-8").read()):
            other = target.split("/")[0] if "/" in target else None
            if other not in RANK:
                unknown.append("%s includes pathkernel/%s, which is in no stage folder" % (rel, target))
            elif other != stage and RANK[other] >= RANK[stage]:
                problems.append("%s (%s) includes pathkernel/%s (%s)" % (rel, stage, target, other))
    for u in unknown:
        print(u)
    for p in problems:
        print("against the layering: " + p)
    if unknown:
        return 2
    return 1 if problems else 0


def self_test():
    """A clean tree passes; an upward include, a peer include, a file outside the stage folders
    and an include that names no stage each fail."""
    with tempfile.TemporaryDirectory() as t:
        def w(p, s):
            os.makedirs(os.path.dirname(os.path.join(t, p)), exist_ok=True)
            open(os.path.join(t, p), "w").write(s)

        w("lib/include/pathkernel/analysis/analyzer.h", '#include "pathkernel/io/npy.h"\n')
        w("lib/src/io/npy.cpp", '#include "pathkernel/io/npy.h"\n#include "pathkernel/models/model.h"\n')
        w("lib/include/pathkernel/io/npy.h", "")
        clean = check(t)
        w("lib/src/io/npy.cpp", '#include "pathkernel/io/npy.h"\n#include "pathkernel/analysis/analyzer.h"\n')
        upward = check(t)
        w("lib/src/explain/explain.cpp", '#include "pathkernel/report/report.h"\n')
        w("lib/include/pathkernel/report/report.h", "")
        w("lib/src/io/npy.cpp", '#include "pathkernel/io/npy.h"\n')
        peers = check(t)
        os.remove(os.path.join(t, "lib/src/explain/explain.cpp"))
        w("lib/src/newfile.cpp", "")
        stray = check(t)
        os.remove(os.path.join(t, "lib/src/newfile.cpp"))
        w("lib/src/report/report.cpp", '#include "pathkernel/report.h"\n')
        flat = check(t)
    ok = clean == 0 and upward == 1 and peers == 1 and stray == 2 and flat == 2
    print("self-test: %s (clean %d, upward %d, peers %d, outside the folders %d, include of no stage %d)"
          % ("ok" if ok else "FAILED", clean, upward, peers, stray, flat))
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        sys.exit(self_test())
    sys.exit(check(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
