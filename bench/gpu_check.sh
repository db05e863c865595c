#!/usr/bin/env bash
# The prepared GPU check (issue 9): one command, one table, at most 8 minutes on one H100 / H200.
#
#   bash tools/gpu_bundle.sh                 # once, on a machine with registry access: .whl/
#   bash bench/gpu_check.sh                  # on the GPU machine (copy the repo and .whl/ there)
#   bash bench/gpu_check.sh --dry-run        # anywhere: tiny sizes, same code (a CPU test runs it)
#
# On the GPU machine it installs the bundled wheels that machine lacks (tools/gpu_wheels.py select)
# into $GPU_CHECK_SITE (/tmp/site) and puts them on PYTHONPATH, then runs bench/gpu_check.py with
# the arguments given. gsplat compiles its CUDA extension at its first call (a few minutes with
# nvcc; the CUDA toolkit must be installed, CUDA_HOME or nvcc on PATH; MAX_JOBS parallel jobs);
# the table shows that time as a row, and torch caches the build in ~/.cache/torch_extensions.
# The training step uses torch's fused AdamW (infra/deepspeed/zero2_gpu_fp16.json), which needs
# no compiler. The check stops after $GPU_CHECK_TIMEOUT seconds (480); rows are printed as they
# are measured, the table at the end. Results go to BENCHMARKS.md ("GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUNDLE=${GPU_CHECK_BUNDLE:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}
if compgen -G "$BUNDLE/*.whl" >/dev/null; then
  mapfile -t wheels < <("$PYTHON" tools/gpu_wheels.py select "$BUNDLE")
  echo "gpu_check: installing ${#wheels[@]} bundled wheel(s) into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}" || exit 1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$SITE/bin:$PATH"  # ninja, for gsplat's build
else
  echo "gpu_check: no wheel bundle in $BUNDLE; using the installed packages"
fi
command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] || \
  echo "gpu_check: no nvcc found: gsplat cannot build its CUDA extension on this machine"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PYTHON" bench/gpu_check.py "$@"
