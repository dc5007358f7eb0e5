#!/usr/bin/env bash
# GPU comparison for viva_tensor's blockwise attention, in one call (budget: 10 minutes):
# the attention benchmark with the GPU implementations (benchmarks/attention.py --gpu): bfloat16, B=1, N=8,
# H=64, T = 1024 .. 32768, causal and not, forward and forward+backward, flash (viva_tensor) against
# jax.nn.dot_product_attention(implementation='xla' and 'cudnn'). Installs nothing but this package
# (`pip install -e .`, skipped when it already imports); prints a markdown table and writes
# benchmarks/results/gpu.md and gpu.json. Usage: bash benchmarks/gpu.sh [max_T] [more attention.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import viva_tensor" 2>/dev/null || pip install -q -e . || true
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
max_t="${1:-32768}"
shift || true
timeout 570 python benchmarks/attention.py --gpu --max-t "$max_t" "$@"
