#!/usr/bin/env bash
# The TWINS step benchmark on an NVIDIA GPU, from a fresh machine, in under 8 minutes.
#
#   bash bench/gpu.sh            # from the repository root; needs python3 (3.10+), an
#                                # NVIDIA driver for CUDA 12, and the network (pip)
#
# Installs CUDA JAX with the project's requirements in .venv-gpu, and PyTorch (the
# reference step's side) in a separate .venv-gpu-torch, so that neither can replace the
# CUDA libraries the other was built against. Then, on one GPU:
#   1. JAX, ResNet-50 at 224 (the reference's CIFAR setting: 32x32 images upsampled in
#      the model), TWINS-AT, PGD-10, float32 and bfloat16, plus a matmul peak;
#   2. the PyTorch reference step, float32 (cuDNN benchmark mode, default TF32 rules);
# and writes bench/results/<device>.json with both and the ratios.
#
# Environment overrides: BATCH (128), METHOD (twins_at), REPEATS (5), STEPS (3),
# PYTHON (python3), SKIP_INSTALL=1 (reuse the two environments).
#
# STATUS: written without a GPU at hand; it has not been run yet. The CPU path of
# bench/step.py that it calls is the one BENCHMARKS.md reports.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PYTHON=${PYTHON:-python3}
BATCH=${BATCH:-128}
METHOD=${METHOD:-twins_at}
REPEATS=${REPEATS:-5}
STEPS=${STEPS:-3}
JAX_VERSION=0.10.2
TORCH_VERSION=2.13.0
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu.sh +$(elapsed)s] $*"; }

command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: no NVIDIA driver?"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | tr ' /' '__' | tr -cd 'A-Za-z0-9_.-')
OUT_DIR=bench/results
TMP=$(mktemp -d)
mkdir -p "$OUT_DIR"

pip_install() {  # venv, packages...
  local venv=$1; shift
  if command -v uv >/dev/null; then
    uv pip install --python "$venv/bin/python" -q "$@"
  else
    "$venv/bin/pip" install -q --progress-bar off --disable-pip-version-check "$@"
  fi
}

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  log "creating .venv-gpu (JAX) and .venv-gpu-torch (PyTorch), installing in parallel"
  "$PYTHON" -m venv .venv-gpu
  "$PYTHON" -m venv .venv-gpu-torch
  (pip_install .venv-gpu -r requirements.txt "jax[cuda12]==$JAX_VERSION" > "$TMP/pip-jax.log" 2>&1) &
  PID_JAX=$!
  (pip_install .venv-gpu-torch "torch==$TORCH_VERSION" numpy > "$TMP/pip-torch.log" 2>&1) &
  PID_TORCH=$!
  wait $PID_JAX || { cat "$TMP/pip-jax.log"; echo "JAX install failed"; exit 1; }
  TORCH_OK=1
  wait $PID_TORCH || { cat "$TMP/pip-torch.log"; echo "PyTorch install failed: JAX only"; TORCH_OK=0; }
  log "installed"
else
  TORCH_OK=1
fi

.venv-gpu/bin/python -c "import jax; d = jax.devices(); assert d[0].platform == 'gpu', d; print('JAX', jax.__version__, d)"
if [[ $TORCH_OK == 1 ]] && ! .venv-gpu-torch/bin/python -c "import torch; assert torch.cuda.is_available(); print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; then
  echo "PyTorch cannot see the GPU (driver too old for its CUDA build?): JAX only"
  TORCH_OK=0
fi

COMMON=(--arch resnet50 --resize 224 --batch "$BATCH" --method "$METHOD" --devices 1
        --repeats "$REPEATS" --steps-per-repeat "$STEPS")
# A persistent compilation cache makes a second run of this script start at once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax-cache-gpu}
for DTYPE in float32 bfloat16; do
  log "JAX $DTYPE"
  timeout 200 .venv-gpu/bin/python bench/step.py "${COMMON[@]}" --dtype $DTYPE --no-torch \
    --measure-peak --json "$TMP/jax-$DTYPE.json" | tee "$TMP/jax-$DTYPE.log" || \
    echo "JAX $DTYPE run failed or timed out (see above)"
done
if [[ $TORCH_OK == 1 ]]; then
  log "PyTorch reference, float32"
  timeout 150 .venv-gpu-torch/bin/python bench/step.py "${COMMON[@]}" --dtype float32 --no-jax \
    --torch-device cuda --json "$TMP/torch-float32.json" | tee "$TMP/torch.log" || \
    echo "PyTorch run failed or timed out (see above)"
fi

.venv-gpu/bin/python - "$TMP" "$OUT_DIR/$DEVICE.json" "$(elapsed)" <<'EOF'
import json, os, sys
tmp, out, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
def load(name):
  p = os.path.join(tmp, name)
  return json.load(open(p)) if os.path.exists(p) else None
torch_run = load('torch-float32.json')
result = {'script': 'bench/gpu.sh', 'wall_s': seconds, 'torch_float32': torch_run, 'jax': {}}
for dtype in ('float32', 'bfloat16'):
  run = load(f'jax-{dtype}.json')
  if run is None:
    continue
  result['jax'][dtype] = run
  for part in ('train', 'eval'):
    t = (torch_run or {}).get(part, {}).get('torch_images_per_s')
    j = run[part]['jax_images_per_s']
    run[part]['ratio_jax_over_torch_float32'] = j / t if t else None
  line = f"{dtype:9s} train {run['train']['jax_images_per_s']:9.1f} img/s"
  if torch_run:
    line += (f"  torch fp32 {torch_run['train']['torch_images_per_s']:9.1f} img/s"
             f"  ratio {run['train']['ratio_jax_over_torch_float32']:.3f}")
  if 'jax_fraction_of_nominal_peak' in run['train']:
    line += f"  {100 * run['train']['jax_fraction_of_nominal_peak']:.1f}% of nominal peak"
  line += (f"  {100 * run['train'].get('jax_fraction_of_measured_peak', float('nan')):.1f}% "
           "of measured matmul peak")
  print(line)
json.dump(result, open(out, 'w'), indent=1)
print('wrote', out)
EOF
log "done in $(elapsed) s"
