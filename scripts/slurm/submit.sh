#!/usr/bin/env bash
# Analyzes or explains a run on a Slurm cluster in N shards and merges them:
#   scripts/slurm/submit.sh [analyze|explain] RUN OUT N [flags...]
# (analyze when the first word is neither; a run folder named so is given as ./explain) submits
# a job array of N tasks (shard.sbatch: `pathkernel COMMAND RUN --shard I/N` into
# OUT.shards/shard_I) and a merge job that runs after all of them succeed (--dependency=afterok;
# merge.sbatch: `pathkernel merge ... --out OUT`). For explain with N > 1, a second job array of
# N-1 tasks runs between them (walk.sbatch: `pathkernel merge ... --walk K`): through an
# optimizer with memory each part's share of the later parts' steps, walked at once instead of
# one after another in the merge (nothing to do for plain SGD). Prints the job ids.
# Extra sbatch options go in SBATCH_OPTIONS as an array-free string of words, e.g.
# SBATCH_OPTIONS="--partition=gpu --time=2:00:00" (each word one option, no shell syntax).
set -euo pipefail
here="$(dirname "$(realpath "$0")")"
command=analyze
if [ "${1:-}" = analyze ] || [ "${1:-}" = explain ]; then
  command="$1"
  shift
fi
usage="usage: submit.sh [analyze|explain] RUN OUT N [flags...]"
run="$(realpath "${1:?$usage}")"
out="$(realpath -m "${2:?$usage}")"
n="${3:?$usage}"
shift 3
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "submit.sh: N must be a positive whole number, got '$n'" >&2; exit 2; }
[ -e "$out" ] && { echo "submit.sh: $out exists; give a new OUT" >&2; exit 2; }
shards="$out.shards"
[ -e "$shards" ] && { echo "submit.sh: $shards exists (an earlier submission?); remove it or give another OUT" >&2; exit 2; }
mkdir -p "$shards"
read -r -a extra <<< "${SBATCH_OPTIONS:-}"
array=$(sbatch --parsable "${extra[@]}" --array="0-$((n - 1))" --output="$shards/shard_%a.log" \
  "$here/shard.sbatch" "$command" "$run" "$shards" "$@")
array="${array%%;*}"
before="$array"
walks=""
if [ "$command" = explain ] && [ "$n" -gt 1 ]; then
  walks=$(sbatch --parsable "${extra[@]}" --dependency="afterok:$array" --array="0-$((n - 2))" \
    --output="$shards/walk_%a.log" "$here/walk.sbatch" "$shards" "$n")
  walks="${walks%%;*}"
  before="$walks"
fi
merge=$(sbatch --parsable "${extra[@]}" --dependency="afterok:$before" --output="$shards/merge.log" \
  "$here/merge.sbatch" "$shards" "$n" "$out")
merge="${merge%%;*}"
echo "array job $array ($n shards into $shards),${walks:+ walk array job $walks ($((n - 1)) parts),} merge job $merge (into $out)"
