#!/usr/bin/env bash
# Behaviour unchanged (issue 24): builds two commits side by side, runs the same jobs with each,
# and compares what they wrote byte for byte.
#
#   bash scripts/compare_outputs.sh BEFORE [AFTER] [--full]
#
# BEFORE and AFTER are commits (AFTER defaults to HEAD); each is checked out with `git worktree`
# under $PATHKERNEL_COMPARE_DIR (default /tmp/pathkernel-compare) and built there (Release, no
# tests or benchmarks; ccache shares objects between the two). The jobs, one thread each:
#   - training: the default job's model (mlp:128:tanh, batch 64, lr 0.1; 300 steps, or the whole
#     epoch of 938 with --full), a CNN with Adam, an MLP with momentum, weight decay and a cosine
#     schedule, RMSprop with momentum, Adadelta, the note's one-parameter toy at a large rate; both
#     binaries train each run and every checkpoint, state file and step record (without its
#     timings) must be equal;
#   - analyses of the runs BEFORE trained, by both binaries: the default job's analysis (64
#     probes, --second-order), --exact with --kinks on the CNN, --sharpness, the Adam CNN's Kopt,
#     a --range with --every, RMSprop, Adadelta with --every, a recorded PyTorch run
#     (examples/record_mlp.py), the toy;
#     explain (with --exact, --self-influence, --project; two shards and their merge); report of
#     five of BEFORE's analyses (figures, their data and scripts, report.html); a small sweep.
# Compared: every file each job wrote. Binary files (arrays/*.npy, checkpoints, PNGs) byte for
# byte, PDFs but for their creation dates; text files (CSV, HTML, gnuplot scripts) byte for byte once each side's folder name
# (before/, after/) is replaced by one name; JSON without timings (keys holding "seconds" or
# "time") and a run's creation time, commit and manifest digest. Prints each difference; exit
# status 1 when there is one, 0 when every file agrees.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(pwd)
before=""
after=HEAD
full=0
for a in "$@"; do
  case "$a" in
    --full) full=1 ;;
    *) if [ -z "$before" ]; then before=$a; else after=$a; fi ;;
  esac
done
if [ -z "$before" ]; then
  echo "usage: bash scripts/compare_outputs.sh BEFORE [AFTER] [--full]" >&2
  exit 2
fi
work=${PATHKERNEL_COMPARE_DIR:-/tmp/pathkernel-compare}
data=/usr/share/datasets/fashion-mnist
python=/usr/bin/python3
mkdir -p "$work"
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1

build() {  # build COMMIT NAME
  local tree="$work/$2"
  if [ -d "$tree" ]; then git -C "$src" worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"; fi
  git -C "$src" worktree add --detach "$tree" "$1" >&2
  echo "compare: building $2 ($(git -C "$tree" rev-parse --short HEAD))" >&2
  CCACHE_BASEDIR="$tree" cmake -S "$tree" -B "$tree/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPATHKERNEL_BUILD_TESTS=OFF -DPATHKERNEL_BUILD_BENCH=OFF >&2
  CCACHE_BASEDIR="$tree" cmake --build "$tree/build" -j 2 >&2
}
build "$before" before
build "$after" after

steps=300
[ "$full" = 1 ] && steps=938
out="$work/out"
rm -rf "$out"
mkdir -p "$out"
cd "$out"
declare -A train_args=(
  [default]="--model mlp:128:tanh --steps $steps --lr 0.1 --batch 64 --checkpoint-every 100"
  [cnn-adam]="--model cnn:4,8:relu --train-limit 1000 --steps 40 --optimizer adam --lr 1e-3 --checkpoint-every 10"
  [mlp-momentum]="--model mlp:32:tanh --train-limit 1000 --steps 60 --momentum 0.9 --weight-decay 1e-3 --lr-schedule cosine --checkpoint-every 20"
  [rmsprop]="--model mlp:16:tanh --train-limit 500 --steps 30 --optimizer rmsprop --momentum 0.5 --lr 1e-3 --checkpoint-every 10"
  [toy]="--model toy:wave --steps 30 --batch 32 --lr 6 --checkpoint-every 1"
  [adadelta]="--model mlp:16:tanh --train-limit 1000 --steps 100 --optimizer adadelta --lr 1 --checkpoint-every 50"
)
status=0
differ() { echo "DIFFERS: $*"; status=1; }

for side in before after; do
  for run in "${!train_args[@]}"; do
    data_arg=$data
    [ "$run" = toy ] && data_arg=synthetic:wave
    # shellcheck disable=SC2086
    "$work/$side/build/apps/pathkernel" train --data "$data_arg" ${train_args[$run]} --threads 1 \
      --out "$side-runs/$run" > /dev/null 2>> "$side-train.log"
  done
done
for run in "${!train_args[@]}"; do  # training: the same weights, states and step records
  for f in before-runs/"$run"/checkpoints/*; do
    cmp -s "$f" "after-runs/$run/checkpoints/$(basename "$f")" || differ "$f"
  done
  "$python" - "before-runs/$run/steps.jsonl" "after-runs/$run/steps.jsonl" <<'EOF' || differ "$run/steps.jsonl"
import json, sys
def rows(p):
    return [{k: v for k, v in json.loads(l).items() if "seconds" not in k and "time" not in k} for l in open(p)]
sys.exit(0 if rows(sys.argv[1]) == rows(sys.argv[2]) else 1)
EOF
done
# A recorded PyTorch run, recorded once.
"$python" "$src/examples/record_mlp.py" recorded --steps 40 --train-limit 600 > /dev/null 2>&1

# NAME|COMMAND ARGS: both binaries run each job on the same inputs (what BEFORE trained and
# analyzed), so the outputs must agree.
jobs=(
  "analyze-default|analyze before-runs/default --probes 64 --second-order"
  "analyze-cnn-exact|analyze before-runs/cnn-adam --probes 8 --exact 4 --kinks"
  "analyze-momentum-sharpness|analyze before-runs/mlp-momentum --probes 16 --sharpness 20 --exact 6"
  "analyze-range|analyze before-runs/default --probes 8 --range 50:120 --every 3"
  "analyze-rmsprop|analyze before-runs/rmsprop --probes 8"
  "analyze-recorded|analyze recorded --probes 8 --second-order"
  "analyze-toy|analyze before-runs/toy --probes 4"
  "analyze-adadelta|analyze before-runs/adadelta --probes 8 --range 30:90 --every 7"
  "explain-momentum|explain before-runs/mlp-momentum --probes 3 --self-influence --exact 3"
  "explain-default|explain before-runs/default --probes 2"
  "explain-momentum-project|explain before-runs/mlp-momentum --probes 2 --project 64"
  "explain-recorded|explain recorded --probes 2 --self-influence"
  "explain-adadelta|explain before-runs/adadelta --probes 2 --self-influence"
  "explain-shard1|explain before-runs/default --probes 2 --shard 1/2"
  "explain-shard2|explain before-runs/default --probes 2 --shard 2/2"
  "merge-explain|merge before/explain-shard1 before/explain-shard2"
  "report-default|report before/analyze-default"
  "report-cnn-exact|report before/analyze-cnn-exact"
  "report-momentum-sharpness|report before/analyze-momentum-sharpness"
  "report-recorded|report before/analyze-recorded"
  "report-toy|report before/analyze-toy"
  "sweep-small|sweep --lr 0.05,2 --data $data --model mlp:8:tanh --train-limit 300 --steps 20 --probes 4"
)
for side in before after; do
  for job in "${jobs[@]}"; do
    name=${job%%|*}
    args=${job#*|}
    case "$args" in analyze*|explain*|sweep*) args="$args --threads 1" ;; esac
    # shellcheck disable=SC2086
    "$work/$side/build/apps/pathkernel" $args --out "$side/$name" > /dev/null 2>> "$side-jobs.log" ||
      differ "$side: $args failed (see $out/$side-jobs.log)"
  done
done
side_names='s#(^|[^A-Za-z0-9_-])(before|after)/#\1SIDE/#g'
for job in "${jobs[@]}"; do
  name=${job%%|*}
  [ -d "before/$name" ] || continue
  (cd "before/$name" && find . -type f | sort) > "$work/files-before"
  (cd "after/$name" 2>/dev/null && find . -type f | sort) > "$work/files-after" || true
  cmp -s "$work/files-before" "$work/files-after" || differ "$name: the file lists differ"
  while read -r f; do
    case "$f" in
      *.json|*.jsonl)
        # Without timings (keys holding "seconds" or "time"), a run's creation time and commit,
        # and with each side's folder named alike (a sweep's runs record where they are).
        "$python" - "before/$name/$f" "after/$name/$f" <<'EOF' || differ "$name/$f"
import json, re, sys
# When a run was made, by which commit, and the digest of a manifest that holds both.
UNSTABLE = {"created_unix", "git_revision", "manifest_sha256"}
def strip(v):
    if isinstance(v, dict):
        return {k: strip(x) for k, x in v.items() if "seconds" not in k and "time" not in k and k not in UNSTABLE}
    if isinstance(v, list):
        return [strip(x) for x in v]
    if isinstance(v, str):
        return re.sub(r"(^|[^\w-])(before|after)/", r"\1SIDE/", v)
    return v
def load(p):
    text = open(p).read()
    if p.endswith(".jsonl"):
        return [strip(json.loads(line)) for line in text.splitlines() if line.strip()]
    return strip(json.loads(text))
a, b = (load(p) for p in sys.argv[1:3])
sys.exit(0 if a == b else 1)
EOF
        ;;
      *.html|*.gp|*.csv|*.txt)
        # Text: byte for byte once each side's folder is named alike.
        cmp -s <(sed -E "$side_names" "before/$name/$f") <(sed -E "$side_names" "after/$name/$f") || differ "$name/$f"
        ;;
      *.pdf)
        # A PDF holds the time it was drawn.
        cmp -s <(grep -av 'CreationDate\|ModDate' "before/$name/$f") <(grep -av 'CreationDate\|ModDate' "after/$name/$f") ||
          differ "$name/$f"
        ;;
      *) cmp -s "before/$name/$f" "after/$name/$f" || differ "$name/$f" ;;
    esac
  done < "$work/files-before"
done
if [ "$status" = 0 ]; then
  echo "compare: every output of $(git -C "$src" rev-parse --short "$before") and $(git -C "$src" rev-parse --short "$after") agrees"
fi
exit "$status"
