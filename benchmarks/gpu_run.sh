#!/usr/bin/env bash
# The GPU checks, then the GPU tables, in one run and one markdown report.
#   1. the GPU tests (tests/test_gpu.py, `-m gpu`): graphed step against eager with G_ema, the paper's model through
#      the CLI and resumed, torchrun over NCCL with SyncBN, a checkpoint moving between GPU and CPU;
#   2. the step against the pytorch/examples loop (benchmarks/train_step.py);
#   3. the throughput table: the standard 64 px model and the paper's lsun_bedroom_64 (ngf/ndf 128, kernel 5), our
#      step per mode against the pytorch/examples loop, the data pipeline, end to end, MFU, peak memory
#      (benchmarks/gpu_throughput.py; --all adds faces_64 and the 128 px model);
#   4. the trainer under torchrun over NCCL (plain, and with bf16 gradient compression inside the graph);
#   5. DDP's all-reduce per model and the 8/16/64-GPU projection (benchmarks/scaling.py).
# Usage, on a machine with a CUDA GPU and the project installed: bash benchmarks/gpu_run.sh [--all] [RESULTS_DIR]
# The report is RESULTS_DIR/report.md (default runs/gpu_benchmarks), each section's full log beside it. The whole
# run keeps within GPU_RUN_BUDGET_S seconds (default 480): a section that would run past it is cut and marked so.
set -uo pipefail
cd "$(dirname "$0")/.."
models=standard,lsun_bedroom_64
if [ "${1:-}" = "--all" ]; then models=standard,lsun_bedroom_64,faces_64,standard_128; shift; fi
results=${1:-runs/gpu_benchmarks}
mkdir -p "$results"
report="$results/report.md"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))  # loader workers: all cores but the trainer's and one spare
export PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + ${GPU_RUN_BUDGET_S:-480} ))

# section NAME CAP_S COMMAND...: run COMMAND with at most CAP_S seconds (less if the budget has less left), its
# output into NAME.log and, fenced, into the report.
section() {
  local name=$1 cap=$2; shift 2
  local left=$(( deadline - $(date +%s) ))
  local limit=$(( cap < left ? cap : left ))
  echo "== $name" >&2
  { echo; echo "## $name"; echo; } >> "$report"
  if [ "$limit" -le 10 ]; then
    echo "not run: the run's time budget (GPU_RUN_BUDGET_S) was spent" >> "$report"
    return
  fi
  local began=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$results/$name.log" 2>&1
  local rc=$? took=$(( $(date +%s) - began ))
  { echo "\`$*\` (exit $rc, ${took} s$([ $rc -eq 124 ] && echo ", cut at ${limit} s"))"; echo;
    echo '```'; grep -v -E "^\[|it/s\]|s/it\]" "$results/$name.log" | tail -60; echo '```'; } >> "$report"
  tail -5 "$results/$name.log" >&2
}

commit=$(git rev-parse --short HEAD 2>/dev/null || echo "not a git checkout")
dirty=$(git status --porcelain 2>/dev/null | grep -qv '^??' && echo " (with uncommitted changes)" || true)
{
  echo "# dcgan-dist GPU report"
  echo
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | paste -sd';')"
  echo "- torch: $(python3 -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
  echo "- commit: $commit$dirty"
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
} > "$report"

section gpu_tests 300 python3 -m pytest -m gpu -n0 -q -rs tests/test_gpu.py
section train_step 60 python3 benchmarks/train_step.py --steps 30
section gpu_throughput 150 python3 benchmarks/gpu_throughput.py --models "$models" --workers "$workers"

section photo_shards 60 python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path; from gpu_throughput import photo_shards
print(photo_shards(Path('$scratch/photos'), 8000, 64, fmt='raw'))"
for mode in "true none" "true bf16"; do
  set -- $mode
  section "torchrun_graph_$1_compression_$2" 45 torchrun --standalone --nproc_per_node=1 -m dcgan_dist.train \
    --config configs/lsun_bedroom_64.yaml --run-dir "$scratch/nccl_run_$1_$2" data.shards="$scratch/photos" \
    data.loader_workers="$workers" model.ngf=64 model.ndf=64 model.kernel=4 model.z_prior=normal train.images=128000 \
    log.every_images=25600 log.sample_every_images=128000 log.checkpoint_every_images=128000 perf.cuda_graph=$1 \
    perf.grad_compression=$2
done

gpus=$(nvidia-smi --list-gpus | wc -l)
section scaling 60 python3 benchmarks/scaling.py --models "$models" --device cuda \
  --workers "$([ "$gpus" -ge 2 ] && echo 1,2 || echo 1)" --sync-bn off --batch 128

echo "report: $report" >&2
cat "$report"
