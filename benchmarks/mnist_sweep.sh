#!/usr/bin/env bash
# Candidate settings for the embedded MNIST default, trained side by side on a GPU and judged by one classifier.
# Usage (device tool, shards/mnist5k carried): bash benchmarks/mnist_sweep.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
run() {  # name, overrides...
  local name=$1; shift
  python3 -m dcgan_dist.train --run-dir /tmp/sweep/$name data.num_workers=6 train.device=cuda \
    log.every_images=50000 "$@" > "$out/$name.log" 2>&1 || { echo "$name failed"; tail -5 "$out/$name.log"; }
}
run w32_150k_s0 train.images=150000 &
run w32_150k_s1 train.images=150000 train.seed=1 &
run w32_250k_s0 train.images=250000 &
wait
run w64_150k_s0 train.images=150000 model.ngf=64 model.ndf=64 &
run w64_150k_s1 train.images=150000 model.ngf=64 model.ndf=64 train.seed=1 &
run w48_150k_s0 train.images=150000 model.ngf=48 model.ndf=48 &
wait
ls /tmp/sweep/*/checkpoints/ | head -40
python3 benchmarks/sample_quality.py --shards shards/mnist5k $(ls -d /tmp/sweep/*/checkpoints | while read d; do ls $d/ckpt-*.pt | tail -1; done) 2>&1 | tee "$out/quality.txt" | tail -14
