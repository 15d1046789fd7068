#!/usr/bin/env bash
# One GPU check for a lent H100/H200 (about 8 minutes): the train-step throughput of the full-width
# 7B geometry (few layers) for each attention implementation, printed as one table.
#   bash bench/gpu_check.sh            (writes $OUT or ./gpu_check/*.json)
# Uses $PYTHON (default python3) when it already has a GPU JAX; otherwise installs jax[cuda12] into
# .venv-gpu (needs PyPI: the lent machines reach no network, so carry a prepared venv there).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ! $PY -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  python3 -m venv .venv-gpu && . .venv-gpu/bin/activate && PY=python
  pip install -q -e . "jax[cuda12]==0.10.2" 2>&1 | tail -2
fi
$PY -c "import echo4o_jax" 2>/dev/null || $PY -m pip install -q -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 420 $PY bench/train_throughput.py --config configs/bagel_7b_geometry_small.py --steps 5 \
  --impls pallas_gpu,xla_blockwise,xla_dense --out "$OUT/train.json" 2>&1 | tee "$OUT/train.log" | tail -6
