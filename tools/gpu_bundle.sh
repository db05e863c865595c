#!/usr/bin/env bash
# Build .whl/, the wheel bundle that bench/gpu_check.sh installs on a GPU machine with no network.
#
#   bash tools/gpu_bundle.sh            # here, with registry access; PYTHON=... the project's venv
#
# The GPU machine to plan for (docs: BENCHMARKS.md, "GPU check") has Python 3.12, PyTorch,
# torchvision, transformers, accelerate, safetensors, scikit-image, opencv, pyarrow and
# tensorboard, but no diffusers, deepspeed, gsplat, webdataset or lpips. The bundle holds those
# five and their dependency closure (tools/gpu_wheels.py pins: this environment's versions,
# without torch, torchvision, triton, numpy, scipy, pillow and nvidia-*), as cp312 manylinux
# x86_64 or pure-Python wheels; a package published only as a source distribution is built
# here into a pure-Python wheel. The bundle must stay under 64 MiB (what one device call carries).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${GPU_CHECK_BUNDLE:-.whl}
LIMIT_MIB=64
mkdir -p "$OUT"
rm -f "$OUT"/*.whl
for pin in $("$PYTHON" tools/gpu_wheels.py pins); do
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$OUT" "$pin" 2>/dev/null; then
    echo "gpu_bundle: no binary wheel of $pin; building a pure-Python wheel from its source" >&2
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$pin"
  fi
done
for whl in "$OUT"/*.whl; do
  case "$whl" in
    *-py3-none-*.whl|*cp312*|*abi3*) ;;
    *) echo "gpu_bundle: $whl is not a Python 3.12 wheel" >&2; exit 1 ;;
  esac
done
size=$(du -sm "$OUT" | cut -f1)
echo "gpu_bundle: $(ls "$OUT"/*.whl | wc -l) wheels, ${size} MiB in $OUT"
if [ "$size" -gt "$LIMIT_MIB" ]; then
  echo "gpu_bundle: over the ${LIMIT_MIB} MiB a device call carries" >&2
  exit 1
fi
