#!/usr/bin/env bash
# Analyzes a run on a Slurm cluster in N shards and merges them:
#   scripts/slurm/submit.sh RUN OUT N [analyze flags...]
# submits a job array of N tasks (analyze_shard.sbatch: `pathkernel analyze RUN --shard I/N`
# into OUT.shards/shard_I) and a merge job that runs after all of them succeed
# (--dependency=afterok; merge.sbatch: `pathkernel merge ... --out OUT`). Prints the job ids.
# Extra sbatch options go in SBATCH_OPTIONS as an array-free string of words, e.g.
# SBATCH_OPTIONS="--partition=gpu --time=2:00:00" (each word one option, no shell syntax).
set -euo pipefail
here="$(dirname "$(realpath "$0")")"
run="$(realpath "${1:?usage: submit.sh RUN OUT N [analyze flags...]}")"
out="$(realpath -m "${2:?usage: submit.sh RUN OUT N [analyze flags...]}")"
n="${3:?usage: submit.sh RUN OUT N [analyze flags...]}"
shift 3
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "submit.sh: N must be a positive whole number, got '$n'" >&2; exit 2; }
[ -e "$out" ] && { echo "submit.sh: $out exists; give a new OUT" >&2; exit 2; }
shards="$out.shards"
[ -e "$shards" ] && { echo "submit.sh: $shards exists (an earlier submission?); remove it or give another OUT" >&2; exit 2; }
mkdir -p "$shards"
read -r -a extra <<< "${SBATCH_OPTIONS:-}"
array=$(sbatch --parsable "${extra[@]}" --array="0-$((n - 1))" --output="$shards/shard_%a.log" \
  "$here/analyze_shard.sbatch" "$run" "$shards" "$@")
array="${array%%;*}"
merge=$(sbatch --parsable "${extra[@]}" --dependency="afterok:$array" --output="$shards/merge.log" \
  "$here/merge.sbatch" "$shards" "$n" "$out")
merge="${merge%%;*}"
echo "array job $array ($n shards into $shards), merge job $merge (into $out)"
