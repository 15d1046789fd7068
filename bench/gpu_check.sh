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
for impl in xla_blockwise xla_dense; do
  timeout 240 $PY bench/train_throughput.py --config configs/bagel_7b_geometry_small.py --steps 5 \
    --set model.attention_impl=$impl --out "$OUT/train_$impl.json" > "$OUT/train_$impl.log" 2>&1 \
    || echo "{\"attention_impl\": \"$impl\", \"error\": \"failed or timed out (see train_$impl.log)\"}" > "$OUT/train_$impl.json"
done
$PY - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'attention':<16}{'compile s':>10}{'step s':>9}{'tokens/s':>11}{'MFU':>7}{'peak GiB':>10}")
for f in sorted(out.glob("train_*.json")):
    r = json.loads(f.read_text())
    if "error" in r:
        print(f"{r['attention_impl']:<16} {r['error']}"); continue
    mem = (r.get("peak_device_memory_bytes") or 0) / 2**30
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
    print(f"{r['attention_impl']:<16}{r['compile_seconds']:>10.1f}{r['step_seconds']:>9.3f}"
          f"{r['tokens_per_second']:>11.0f}{mfu:>7}{mem:>10.1f}")
PY
