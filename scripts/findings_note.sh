#!/usr/bin/env bash
# docs/findings.md, "The note's open question" (issue 13): on 1000 Fashion-MNIST images, for
# mlp:128:tanh, mlp:128:relu and cnn:8,16:relu, full-batch gradient descent (batch = the 1000)
# and SGD (batch 64), 100 steps each at learning rates 0.5, 1 and 2 times 2 / lambda_0 (and 0.1
# for the CNN; lambda_0: the training loss's top Hessian eigenvalue at initialization, measured
# here), with weight decay 0 and 1e-3. Each run is analyzed at 16 probes x 10 logits with the
# exact path kernel (split at the kinks for the ReLU models, whose kinks are walked: every probe
# and batch example, the CNN's first 64 of each batch and steps under 400 kinks per example), sharpness every 10 steps (every 20 for
# the CNN) on the 1000 training images, and reported; then one table
# (scripts/findings_note_table.py). Training runs one chain per model family, the analyses two
# at a time. Resumable: finished runs and analyses are kept. About an hour and a half on two cores.
#
# usage: scripts/findings_note.sh [OUT]        (default: findings/note)
set -euo pipefail
cd "$(dirname "$0")/.."
pk=./build/apps/pathkernel
common=(--train-limit 1000 --checkpoint-every 10)

# One analysis and its report (the second pass of the script, two at a time): DIR is OUT/MODEL/RUN.
if [ "${1:-}" = --analyze ]; then
  dir=$2 model=$(basename "$(dirname "$2")")
  # The CNN's walk costs about 1 ms per kink of one example (docs/benchmarks.md) and a full batch
  # of 1000 crosses ~65 000 per step: it walks the first 64 examples of each batch (for GD a
  # fresh random sample every step, the batch being reshuffled), as SGD's batches have, and skips
  # the steps on which one example would cross 400 kinks or more (the table counts them).
  exact=(--exact 4) every=10
  case $model in
    mlp*relu*) exact=(--exact 2 --kinks) ;;
    cnn*) exact=(--exact 2 --kinks --kinks-examples 64 --kinks-max 400) every=20 ;;
  esac
  [ -f "$dir/analysis/summary.json" ] || $pk analyze "$dir/run" --probes 16 "${exact[@]}" --sharpness "$every" \
    --sharpness-examples 1000 --sharpness-iterations 40 --out "$dir/analysis" --force >"$dir/analyze.log" 2>&1 || {
      st=$?; [ "$st" = 4 ] || { cat "$dir/analyze.log" >&2; exit "$st"; }; }
  [ -f "$dir/report/report.html" ] || $pk report "$dir/analysis" --out "$dir/report" --force >/dev/null
  echo "analyzed $dir" >&2
  exit 0
fi

out=${1:-findings/note}
mkdir -p "$out"

# lambda_0 of a model: one tiny full-batch step, analyzed with --sharpness 1.
lambda0() {
  local model=$1 dir="$out/$1-lambda0"
  [ -f "$dir/run/COMPLETE" ] || $pk train --model "$model" "${common[@]}" --batch 1000 --steps 1 --lr 1e-6 \
    --out "$dir/run" >/dev/null
  [ -f "$dir/analysis/summary.json" ] || $pk analyze "$dir/run" --probes 2 --sharpness 1 --sharpness-examples 1000 \
    --out "$dir/analysis" --force >/dev/null
  python3 -c 'import csv,sys; print(next(csv.DictReader(open(sys.argv[1])))["lambda_max_train"])' \
    "$dir/analysis/sharpness.csv"
}

train_one() {  # model regime batch factor lr wd
  local model=$1 regime=$2 batch=$3 factor=$4 lr=$5 wd=$6
  local dir="$out/$model/$regime-x$factor-wd$wd"
  mkdir -p "$dir"
  [ -f "$dir/run/COMPLETE" ] || [ -f "$dir/diverged" ] || {
    rm -rf "$dir/run"
    local st=0
    $pk train --model "$model" "${common[@]}" --batch "$batch" --steps 100 --lr "$lr" --weight-decay "$wd" \
      --out "$dir/run" >"$dir/train.log" 2>&1 || st=$?
    if [ "$st" = 3 ]; then echo "lr $lr" >"$dir/diverged"; return 0; fi
    [ "$st" = 0 ] || { cat "$dir/train.log" >&2; return "$st"; }
  }
}

grid() {
  local model=$1 l0
  l0=$(lambda0 "$model")
  echo "$model: lambda_0 = $l0" >&2
  # The ReLU CNN dies within its first steps from 0.5 x on (2 / lambda_0 is large at its
  # initialization): it gets a smaller rate too.
  local factors="0.5 1 2"
  case $model in cnn*) factors="0.1 0.5 1 2" ;; esac
  for factor in $factors; do
    local lr
    lr=$(python3 -c 'import sys; print("%.4g" % (float(sys.argv[1]) * 2 / float(sys.argv[2])))' "$factor" "$l0")
    for wd in 0 1e-3; do
      train_one "$model" gd 1000 "$factor" "$lr" "$wd"
      train_one "$model" sgd 64 "$factor" "$lr" "$wd"
    done
  done
}

(grid mlp:128:tanh && grid cnn:8,16:relu) &
grid mlp:128:relu &
wait
# The analyses, the CNN's (the longest) first, two at a time.
for m in cnn:8,16:relu mlp:128:relu mlp:128:tanh; do
  for d in "$out/$m"/*/; do [ -f "$d/run/COMPLETE" ] && printf '%s\0' "${d%/}"; done
done | xargs -0 -n 1 -P 2 "$0" --analyze
python3 scripts/findings_note_table.py "$out"
