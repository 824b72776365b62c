#!/usr/bin/env bash
# The short CPU Omniglot runs quoted in README (one thread each, run one after another).
# Usage: OMNIGLOT_ROOT=../shared/data/omniglot bash scripts/omniglot_cpu_runs.sh OUTDIR [NAME...]
# (no NAME: all runs below). Each run writes OUTDIR/<name>/{metrics.csv,results.json,curve.png,
# checkpoint.pt} and OUTDIR/<name>.log; an interrupted run continues where it stopped (--resume).
# Two queues fit two cores, e.g. "... fomaml-5w1s anil-5w1s signmaml-5w1s imaml-5w1s" and
# "... sharpmaml-5w1s memoryreduced-5w1s maml-5w5s" in parallel.
set -u
export OMNIGLOT_ROOT=${OMNIGLOT_ROOT:-../shared/data/omniglot}
out=${1:-runs/omniglot-cpu}
shift || true
# The flags are those of the runs quoted in README (run 2026-12-01, before meta-train gave
# signmaml its 5 steps and memoryreduced its lr 0.1 by default: they ran 0.0035 x 1 and 0.4 x 20).
# maml-5w1s is the 2026-11-23 run: meta-train --dataset omniglot --algorithm maml --iterations 2500
declare -A ARGS=(
    [fomaml-5w1s]="--algorithm fomaml --iterations 1500"
    [anil-5w1s]="--algorithm anil --iterations 1000"
    [signmaml-5w1s]="--algorithm signmaml --inner-steps 1 --iterations 1000"
    [imaml-5w1s]="--algorithm imaml --iterations 250"
    [sharpmaml-5w1s]="--algorithm sharpmaml --iterations 300"
    [memoryreduced-5w1s]="--algorithm memoryreduced --inner-lr 0.4 --iterations 600"
    [maml-5w5s]="--algorithm maml --shots 5 --iterations 1000"
)
ORDER=(fomaml-5w1s anil-5w1s signmaml-5w1s imaml-5w1s sharpmaml-5w1s memoryreduced-5w1s maml-5w5s)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")
mkdir -p "$out"
for name in "${names[@]}"; do
    [ -n "${ARGS[$name]:-}" ] || { echo "unknown run $name (one of: ${ORDER[*]})"; exit 2; }
    resume=""
    [ -f "$out/$name/checkpoint.pt" ] && resume="--resume"
    # shellcheck disable=SC2086
    meta-train --dataset omniglot --threads 1 --no-progress --out "$out/$name" $resume \
        ${ARGS[$name]} > "$out/$name.log" 2>&1 || echo "run $name failed (see $out/$name.log)"
done
