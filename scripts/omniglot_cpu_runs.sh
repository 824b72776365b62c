#!/usr/bin/env bash
# The short CPU Omniglot runs quoted in README (one thread each, run one after another).
# Usage: OMNIGLOT_ROOT=../shared/data/omniglot bash scripts/omniglot_cpu_runs.sh [OUTDIR]
# Each run writes OUTDIR/<name>/{metrics.csv,results.json,curve.png,checkpoint.pt};
# an interrupted run continues with the same command (--resume).
set -u
out=${1:-runs/omniglot-cpu}
run() {  # name, then meta-train arguments
    local name=$1; shift
    local resume=""
    [ -f "$out/$name/checkpoint.pt" ] && resume="--resume"
    meta-train --dataset omniglot --threads 1 --no-progress --out "$out/$name" $resume "$@" \
        > "$out/$name.log" 2>&1 || echo "run $name failed (see $out/$name.log)"
}
mkdir -p "$out"
run fomaml-5w1s        --algorithm fomaml        --iterations 1000
run anil-5w1s          --algorithm anil          --iterations 1000
run signmaml-5w1s      --algorithm signmaml      --iterations 1000
run imaml-5w1s         --algorithm imaml         --iterations 300
run sharpmaml-5w1s     --algorithm sharpmaml     --iterations 300
run memoryreduced-5w1s --algorithm memoryreduced --iterations 500
run maml-5w5s          --algorithm maml          --shots 5 --iterations 500
