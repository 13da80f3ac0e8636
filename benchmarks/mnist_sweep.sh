#!/usr/bin/env bash
# Candidate settings for the embedded MNIST default, trained side by side on one GPU and judged by one classifier.
# Usage, on a machine with a CUDA GPU and the project installed: bash benchmarks/mnist_sweep.sh [RESULTS_DIR]
# (default runs/mnist_sweep: one run directory per candidate, their logs and quality.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-runs/mnist_sweep}
mkdir -p "$results"
export PYTHONUNBUFFERED=1
# The default run's shards, written once before the candidates start side by side.
python3 -c "from dcgan_dist.shard.run import builtin_shards; builtin_shards('mnist5k', 'shards/mnist5k')"
run() {  # name, overrides...
  local name=$1; shift
  python3 -m dcgan_dist.train --run-dir "$results/$name" data.loader_workers=6 train.device=cuda \
    log.every_images=50000 "$@" > "$results/$name.log" 2>&1 || { echo "$name failed"; tail -5 "$results/$name.log"; }
}
run w32_150k_s0 train.images=150000 &
run w32_150k_s1 train.images=150000 train.seed=1 &
run w32_250k_s0 train.images=250000 &
wait
run w64_150k_s0 train.images=150000 model.ngf=64 model.ndf=64 &
run w64_150k_s1 train.images=150000 model.ngf=64 model.ndf=64 train.seed=1 &
run w48_150k_s0 train.images=150000 model.ngf=48 model.ndf=48 &
wait
python3 benchmarks/sample_quality.py --shards shards/mnist5k $(for d in "$results"/*/checkpoints; do ls "$d"/ckpt-*.pt | tail -1; done) \
  2>&1 | tee "$results/quality.txt" | tail -14
