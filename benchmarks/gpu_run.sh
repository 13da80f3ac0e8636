#!/usr/bin/env bash
# The GPU benchmarks in one run: the step against the pytorch/examples loop, the throughput table (modes, data
# pipeline, end to end, MFU), the trainer's single-GPU NCCL/DDP path under torchrun (plain, and with bf16 gradient
# compression inside the whole-step graph), and DDP's all-reduce bytes and time per model with the projection to
# 8/16/64 GPUs (benchmarks/scaling.py; more than one GPU here adds the 2-worker rows).
# Usage, on a machine with a CUDA GPU and the project installed: bash benchmarks/gpu_run.sh [RESULTS_DIR]
# Every table is printed and kept in RESULTS_DIR (default runs/gpu_benchmarks).
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-runs/gpu_benchmarks}
mkdir -p "$results"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))  # loader workers: all cores but the trainer's and one spare
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$results/gpu.txt"

echo "== benchmarks/train_step.py"
python3 benchmarks/train_step.py --steps 30 2>&1 | tee "$results/train_step.txt"

echo "== benchmarks/gpu_throughput.py ($workers loader workers)"
python3 benchmarks/gpu_throughput.py --models standard,lsun_bedroom_64,faces_64,standard_128 --workers "$workers" \
  2>&1 | tee "$results/gpu_throughput.log" | grep -v "^\["

echo "== single-GPU NCCL path: torchrun --nproc_per_node=1 (DDP over NCCL, world size 1)"
python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path; from gpu_throughput import photo_shards
photo_shards(Path('$scratch/photos'), 8000, 64)"
for mode in "true none" "false none" "true bf16"; do
  set -- $mode
  echo "-- perf.cuda_graph=$1 perf.grad_compression=$2"
  torchrun --standalone --nproc_per_node=1 -m dcgan_dist.train --config configs/lsun_bedroom_64.yaml \
    --run-dir "$scratch/nccl_run_$1_$2" data.shards="$scratch/photos" data.num_workers="$workers" \
    model.ngf=64 model.ndf=64 model.kernel=4 model.z_prior=normal train.images=128000 log.every_images=25600 \
    log.sample_every_images=128000 log.checkpoint_every_images=128000 perf.amp=bf16 perf.cuda_graph=$1 \
    perf.grad_compression=$2 2>&1 | tee "$results/nccl_$1_$2.txt" | tail -4
done

echo "== benchmarks/scaling.py: DDP all-reduce bytes and ms per model over NCCL, and the 8/16/64-GPU projection"
gpus=$(nvidia-smi --list-gpus | wc -l)
python3 benchmarks/scaling.py --models standard,lsun_bedroom_64,faces_64,standard_128 --device cuda \
  --workers "$([ "$gpus" -ge 2 ] && echo 1,2 || echo 1)" --sync-bn off --batch 128 2>&1 | tee "$results/scaling.txt"
