#!/usr/bin/env bash
# Every GPU number in one call, for the first session that has a GPU (run from anywhere):
#
#   bash benchmarks/gpu_suite.sh            # build, GPU tests, SPEC-shape benchmarks (~8-10 min on an H100)
#   QUICK=1 bash benchmarks/gpu_suite.sh    # reference setup only (~2 min)
#
# Steps: (1) build the C++/CUDA extension in place; (2) pytest -m gpu (the GPU parity cases of every backend);
# (3) benchmarks/bench_gpu.py: op and layer timings (triton, cuda, dense compiled PyTorch, reference, base linear;
# fwd and fwd+bwd; bf16; triton.testing.do_bench) for the reference setup and the SPEC grid, written to
# benchmarks/results/<device>-<date>.{csv,json} with the commit and the device name; (4) the analytic roofline and
# the sm_90 resource table next to them, for comparison. Logs go to benchmarks/results/gpu-suite-<date>/.
# Fails loudly (exit 2) on a machine without a GPU; a failing step is reported and the suite goes on, and the
# exit status is non-zero if any step failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python}"
DATE="$(date +%F)"
LOGS="benchmarks/results/gpu-suite-$DATE"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_suite.sh: ERROR: no CUDA device visible to torch (torch.cuda.is_available() is False)." >&2
    echo "gpu_suite.sh: this suite needs a GPU machine (H100/H200); nothing was run." >&2
    exit 2
fi
unset TRITON_INTERPRET
mkdir -p "$LOGS"
"$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| cuda", torch.version.cuda)'
echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"

FAILED=()
step() {  # step NAME CMD...: run, tee the log, remember failures
    local name="$1"
    shift
    echo "=== $name: $*"
    local t0=$SECONDS
    if "$@" 2>&1 | tee "$LOGS/$name.log"; then
        echo "=== $name: ok ($((SECONDS - t0)) s)"
    else
        echo "=== $name: FAILED ($((SECONDS - t0)) s), log in $LOGS/$name.log" >&2
        FAILED+=("$name")
    fi
}

step build "$PY" setup.py build_ext --inplace
step check-extension "$PY" -c 'import fedamole_kernels as k; print(k.available_backends("cuda"))'
step pytest-gpu "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
if [ "${QUICK:-0}" = "1" ]; then
    step bench-gpu "$PY" benchmarks/bench_gpu.py --quick
else
    step bench-gpu "$PY" benchmarks/bench_gpu.py
fi
step roofline "$PY" benchmarks/roofline.py --out "$LOGS"
step triton-resources "$PY" benchmarks/triton_resources.py --subset --out "$LOGS"

if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "gpu_suite.sh: FAILED steps: ${FAILED[*]}" >&2
    exit 1
fi
echo "gpu_suite.sh: all steps passed; results in benchmarks/results/ (logs: $LOGS)"
