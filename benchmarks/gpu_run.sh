#!/usr/bin/env bash
# The prepared GPU check (one call of the device tool): wheels the GPU image lacks are carried in .whl/.
# Runs the step benchmark, the full throughput table and the single-GPU NCCL/DDP path of the trainer.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)"

echo "== train_step.py (issue 2's benchmark, on the GPU)"
(cd benchmarks && timeout 120 python3 train_step.py --steps 30) 2>&1 | tee "$out/train_step.txt"

echo "== gpu_throughput.py"
(cd benchmarks && timeout 330 python3 gpu_throughput.py --workers ${WORKERS:-14} ${MODES:+--modes $MODES}) 2>&1 | tee "$out/gpu_throughput.log" | grep -v "^\[" | tail -40

echo "== single-GPU NCCL path: torchrun --nproc_per_node=1 (DDP over NCCL, world size 1)"
python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path; from gpu_throughput import photo_shards
photo_shards(Path('/tmp/photos'), 8000, 64)"
for graph in true false; do
  echo "-- perf.cuda_graph=$graph"
  timeout 120 torchrun --standalone --nproc_per_node=1 -m dcgan_dist.train --config configs/lsun_bedroom_64.yaml \
    --run-dir /tmp/nccl_run_$graph data.shards=/tmp/photos data.num_workers=12 model.ngf=64 model.ndf=64 \
    model.kernel=4 model.z_prior=normal train.images=128000 log.every_images=25600 log.sample_every_images=128000 \
    log.checkpoint_every_images=128000 perf.amp=bf16 perf.cuda_graph=$graph 2>&1 | tee "$out/nccl_$graph.txt" | tail -4
done
ls /tmp/nccl_run_*/checkpoints
