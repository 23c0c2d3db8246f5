#!/usr/bin/env bash
# The GPU benchmark on the lent GPU machine, as that machine is: no network, its own python3
# with JAX (CUDA) and PyTorch, plus the wheels in .whl/ that bench/gpu_wheels.sh prepared
# here (grain, array-record, portpicker), installed into /tmp/site without the network.
#
#   here, once:  bash bench/gpu_wheels.sh
#   device tool: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=540)
#   a rerun:     run(command="bash bench/gpu.sh --sections jax --sweep default", carry=[".whl"])
#
# Arguments go to bench/gpu_bench.py (--budget, --sections, --sweep, --xla-flags, ...; its
# docstring). Writes $OUT/<device>.json, $OUT/<device>.workers.log and $OUT/gpu_bench.log
# ($OUT: the device tool's output folder; elsewhere bench/results). About 6 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .whl/ (bash bench/gpu_wheels.sh here, then carry=[\".whl\"]): the input section will fail"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv,noheader || true
"$PYTHON" -c 'import sys, jax, torch; print("python", sys.version.split()[0], "jax", jax.__version__, "torch", torch.__version__)' || true

"$PYTHON" bench/gpu_bench.py --out-dir "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_bench.log"
