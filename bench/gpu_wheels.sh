#!/usr/bin/env bash
# Downloads, here (with the network), the wheels bench/gpu_bench.py needs on the lent GPU
# machine and that its image lacks, into .whl/ (git-ignored), for Python 3.12 on x86-64
# Linux. That machine has no network; the device tool carries .whl along (carry=[".whl"])
# and bench/gpu.sh installs it there with pip --no-index.
#
#   bash bench/gpu_wheels.sh           # download into .whl/, print the wheels and sizes
#   bash bench/gpu_wheels.sh --list    # print the packages only (no network)
#
# The machine's image already holds JAX (CUDA 13), flax, optax, PyTorch, numpy, pillow,
# absl-py, etils, cloudpickle, protobuf, psutil, pyyaml... (device KINDS.md's list). Missing
# there, and needed: grain (the input pipeline, bench/gpu_bench.py's 'input' section), and
# the two packages grain imports that are missing too: array-record and portpicker. Not
# needed: tensorflow-datasets (CIFAR is benchmarked from an in-memory ArraySource of 32x32
# uint8 images), ml-collections (only configs and main.py use it). The versions are the
# ones the tests here run with.
#
# Environment: PYTHON (default python3, any version: pip downloads for 3.12 regardless).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  grain==0.2.18
  array-record==0.8.6
  portpicker==1.6.0
)

if [[ "${1:-}" == "--list" ]]; then
  printf '%s\n' "${PACKAGES[@]}"
  exit 0
fi

PYTHON=${PYTHON:-python3}
# One version of each package: a stale wheel beside a new one stops the install there.
rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any -d .whl "${PACKAGES[@]}"

echo "wheels in .whl/:"
ls -l .whl/*.whl | awk '{printf "  %8.1f KiB  %s\n", $5 / 1024, $9}'
WHEEL_BYTES=$(cat .whl/*.whl | wc -c)
# What the device tool sends: tracked and untracked-not-ignored files, plus .whl.
TREE_BYTES=$(git ls-files -z --cached --others --exclude-standard | xargs -0 cat 2>/dev/null | wc -c)
awk -v w="$WHEEL_BYTES" -v t="$TREE_BYTES" 'BEGIN {
  printf "wheels %.2f MiB; with the working tree %.2f MiB (the device tool takes at most 64 MiB)\n",
    w / 2^20, (w + t) / 2^20
  if (w + t > 64 * 2^20) { print "TOO LARGE for the device tool"; exit 1 }
}'
