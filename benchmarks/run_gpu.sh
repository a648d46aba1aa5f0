#!/usr/bin/env bash
# The GPU checks and figures, in one run on a CUDA machine (about 5-8 minutes, at most 8.5): the GPU-only tests (marker `gpu`:
# CUDA draws bitwise reproducible and sliceable, the law, compiled vs eager, fp16/bf16 noise, GPU fits, pruning on
# CUDA), then the sampler, noise and pruning benchmarks on CUDA. Everything goes to one file.
#
#   bash benchmarks/run_gpu.sh [OUT_FILE]        # default: gpu_figures.txt
#
# Needs torch with CUDA, lightning, torchmetrics, scipy, pytest (a GPU image has them); the package is used from this
# checkout (PYTHONPATH), not installed. torch-pruning is only needed by the structured-pruning rows.
set -uo pipefail
out=${1:-gpu_figures.txt}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{
  echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)"
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo; echo "== GPU tests"
  for tests in tests/test_gpu.py tests/test_pruning_gpu.py; do  # apart: one file's import error must not hide the other
    timeout 90 "$py" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" "$tests"
  done
  echo; echo "== sampler (CUDA)"
  timeout 90 "$py" benchmarks/bench_sampler.py --device cuda --n 16777216 --scipy-n 200000 --reps 7
  echo; echo "== noise in a training step (CUDA)"
  timeout 150 "$py" benchmarks/bench_noise_overhead.py --device cuda --steps 100 --rounds 3
  echo; echo "== pruning evaluation (CUDA)"
  timeout 90 "$py" benchmarks/bench_prune_eval.py --device cuda --methods global,layerwise,neuron,svd --skip-slow
} 2>&1 | tee "$out"
