#!/usr/bin/env bash
# One GPU check for a lent H100/H200 (about 8 minutes), in stages that each have their own time limit
# and write their own log, so that one failing stage does not hide the others:
#   0. the machine and the package versions;
#   1. import check (adds the carried wheels of .whl/ when the machine's Python lacks a package, and our
#      pinned flax/optax/orbax from .whl/pinned/ when the machine's versions do not import our code);
#   2. bench/attention_bench.py on the 7B geometry's ~10.7K-token pack: exactness of each implementation
#      against the XLA reference on this GPU (float32), forward+backward time per layer (bf16), block
#      skipping share, cuDNN over the whole pack for scale, and a sweep of the pallas_gpu launch shapes;
#   3. bench/train_throughput.py on configs/bagel_7b_geometry_small.py (full 7B width, 4 layers):
#      tokens/s, step time, compile time, MFU (official formula), peak memory, device time by the model's
#      named scopes (attention, mlp, qkv, ..., optimizer; from a 2-step trace of the step compiled again
#      without CUDA graphs, which hide their kernels' scopes: +~40 s), for each of $IMPLS
#      (default pallas_gpu) and then pallas_gpu with the sweep's best launch shapes (when >= 5% faster than the
#      defaults on one layer), each in its own process;
#   4. the same with remat `dots` (matmul outputs saved), and both remats with 2 decoder layers (the config's
#      remat traced too: one layer's device time by scope);
#   5. bench/gpu_summary.py: one table of the runs (with each step's attention share), where each run's
#      device memory went (in use / peak so far after setup, compile, the first and the timed steps), and
#      one decoder layer's time and MFU per remat (the 4-layer step's MFU is half embedding/LM-head FLOPs
#      of the official formula) with the step extrapolated to 28 layers.
#   bash bench/gpu_check.sh            (logs and JSON under $OUT, default ./gpu_check in the caller's folder)
# Uses $PYTHON (default python3), which must already have a GPU JAX (the lent machines reach no network):
# stage 0 stops the check (exit 1) when JAX's backend is not the GPU.
# Wheels to carry (prepared where PyPI is reachable; .whl/ is not committed):
#   d="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64"
#   pip download $d -d .whl ml-collections==1.1.0
#   pip download $d -d .whl/pinned flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8
# Measured 2026-11-26 and 2026-11-28 on an H200 and 2026-11-27 on an H100 (bench/results/, README "Design
# notes"); the stages took 50-55 s (attention) and ~90 s per train-step run there: 408 s in all on the H200
# (2026-11-28, before the traced runs compiled the step again), 493 s with them (H200, 2026-11-28).
set -uo pipefail
# OUT (default ./gpu_check) and CONFIG are relative to the caller's folder (CONFIG's default: the repo's
# configs/bagel_7b_geometry_small.py): made absolute before the cd to the repo root
OUT=${OUT:-gpu_check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "error: cannot create OUT=$OUT" >&2; exit 2; }
if [ -n "${CONFIG:-}" ]; then
  [ -f "$CONFIG" ] || { echo "error: CONFIG=$CONFIG: no such file (relative to $PWD)" >&2; exit 2; }
  CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
IMPLS=${IMPLS:-pallas_gpu}  # train-step runs; then pallas_gpu with the sweep's best tuning
CONFIG=${CONFIG:-$PWD/configs/bagel_7b_geometry_small.py}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
stage() { echo; echo "=== $* ($(date +%T))"; }

stage "0 machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY - <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt"
import importlib, sys
print("python", sys.version.split()[0])
for m in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "numpy"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__)
import jax
print("devices", jax.devices())
EOF
# Without a GPU every stage would run on the CPU (Pallas kernels in interpret mode, minutes, the 7B-width
# config risking the host's memory) and the summary would read like a GPU result: stop here instead.
BACKEND=$($PY -c "import jax; print(jax.default_backend())" 2>/dev/null)
if [ "$BACKEND" != gpu ]; then
  echo "error: JAX's backend is ${BACKEND:-unknown (jax does not import with $PY)}, not gpu: this check needs a GPU" \
    "and a GPU JAX (see $OUT/gpu.txt)" >&2
  exit 1
fi

stage "1 imports"
IMPORT_CHECK='import ml_collections, echo4o_jax.train.trainer, echo4o_jax.model.kernels.pallas_flash'
if ! $PY -c "import ml_collections" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! $PY -c "$IMPORT_CHECK" 2>"$OUT/import_err.txt"; then
  echo "machine packages do not import our code:"; tail -3 "$OUT/import_err.txt"
  if ls .whl/pinned/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/pinned .whl/pinned/*.whl \
      && export PYTHONPATH="/tmp/pinned:$PYTHONPATH" && echo "using the pinned flax/optax/orbax wheels"
  fi
  $PY -c "$IMPORT_CHECK" || { echo "imports still fail"; exit 1; }
fi
echo "imports ok"

stage "2 attention alone (one layer, fwd+bwd; pallas_gpu launch-shape sweep)"
timeout ${ATTN_TIMEOUT:-150} $PY bench/attention_bench.py --config "$CONFIG" --iters 10 --cudnn --sweep \
  --impls ${ATTN_IMPLS:-pallas_gpu,xla_blockwise} --out "$OUT/attention.json" 2>&1 | grep -v "^W0000\|^I0000" \
  | tee "$OUT/attention.log" | tail -8
# the sweep's best launch shapes, or nothing when they are the defaults or less than 5% faster than them on
# one layer's forward+backward (the tuned train-step run would then tell nothing new)
BEST=$($PY -c "import json,sys; a=json.load(open(sys.argv[1])); s=a.get('sweep') or {}
d=[r['fwd_bwd_s'] for r in a['results'] if r['impl'] == 'pallas_gpu' and 'fwd_bwd_s' in r]
ok=s.get('best') and s.get('best') != s.get('default') and d and s['best_fwd_bwd_s'] < 0.95 * d[0]
print(s['best'] if ok else '')" "$OUT/attention.json" 2>/dev/null)

# A run that does not fit this GPU (its JSON's error says RESOURCE_EXHAUSTED / out of memory; XLA's
# allocator warnings in the log are not failures: the autotuner probes for more than it gets) is repeated,
# with every later run, with FALLBACK_LAYERS decoder layers (each layer holds ~7 GiB of state); the
# summary's run names say so. The 4-layer geometry peaked at 57.3 GiB on an H100 (2026-11-27).
FALLBACK=()
oom() { $PY -c "import json,sys; e=json.load(open(sys.argv[1])).get('error') or ''
sys.exit(0 if 'RESOURCE_EXHAUSTED' in e or 'out of memory' in e.lower() else 1)" "$1" 2>/dev/null; }
train() {  # train NAME IMPL [--set k=v ...]
  local name=$1 impl=$2 limit=${TRAIN_TIMEOUT:-180}; shift 2
  [[ " $* " == *" --profile-steps "* ]] && limit=${PROFILE_TIMEOUT:-300}  # a traced run compiles the step twice
  timeout $limit $PY bench/train_throughput.py --config "$CONFIG" --steps 5 --impls "$impl" \
    "${FALLBACK[@]}" "$@" --out "$OUT/train_$name.json" 2>&1 | grep -v "^W0000\|^I0000" \
    | tee "$OUT/train_$name.log" | tail -4
  if [ ${#FALLBACK[@]} -eq 0 ] && oom "$OUT/train_$name.json"; then
    FALLBACK=(--set "model.geometry.llm.num_layers=${FALLBACK_LAYERS:-3}")
    stage "3 train step $name did not fit in memory: again with ${FALLBACK[*]} (also for the runs below)"
    mv "$OUT/train_$name.json" "$OUT/oom_$name.json" 2>/dev/null
    train "${name}_${FALLBACK_LAYERS:-3}layers" "$impl" "$@"
  fi
}
for impl in ${IMPLS//,/ }; do  # traced for 2 more steps: device time by named scope (attention, mlp, ...)
  stage "3 train step: $impl"
  train "$impl" "$impl" --profile-steps 2
done
if [ -n "$BEST" ]; then
  stage "3 train step: pallas_gpu with the sweep's best launch shapes: $BEST"
  train pallas_gpu_tuned pallas_gpu --set "model.attention_tuning=$BEST"
fi
# One decoder layer's cost (the summary's per-layer rows): each remat of $LAYER_REMATS at the config's depth
# (the config's own remat: the first run above) and at LOW_LAYERS layers.
CFG_REMAT=$($PY -c "import sys; sys.path.insert(0, 'bench'); from train_throughput import load_config
print(load_config(sys.argv[1]).model.remat)" "$CONFIG" 2>/dev/null)
for remat in ${LAYER_REMATS:-full dots}; do
  if [ "$remat" != "$CFG_REMAT" ]; then
    stage "4 per-layer cost: pallas_gpu remat $remat"
    train "pallas_gpu_$remat" pallas_gpu --set "model.remat=$remat"
  fi
  stage "4 per-layer cost: pallas_gpu remat $remat, ${LOW_LAYERS:-2} layers"
  prof=()  # the config's remat traced at both depths: one layer's device time by scope
  [ "$remat" = "$CFG_REMAT" ] && prof=(--profile-steps 2)
  train "pallas_gpu_${remat}_${LOW_LAYERS:-2}layers" pallas_gpu --set "model.remat=$remat" \
    --set "model.geometry.llm.num_layers=${LOW_LAYERS:-2}" "${prof[@]}"
done

stage "summary"
$PY bench/gpu_summary.py "$OUT"
