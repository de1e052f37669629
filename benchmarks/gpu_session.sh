#!/usr/bin/env bash
# One call on a lent GPU machine (see docs/gpu.md): check, then time, every fused backend; all output
# lands in $OUT (the device tool brings it back) or in benchmarks/results/gpu-run when $OUT is unset.
#
#   bash benchmarks/gpu_session.sh check        correctness (tests/test_gpu_kernels.py, 540 s at most)
#   bash benchmarks/gpu_session.sh aot          launch-specialized AOT report compiled by this image's Triton
#   bash benchmarks/gpu_session.sh bench [...]  `python -m benchmarks` (bf16, every SDXL shape); extra args pass through
#   bash benchmarks/gpu_session.sh plan         the planner's peak for SDXL and Flux.1 at 1024² (bf16, block
#                                               checkpointing) against the real step's max_memory_allocated
#   bash benchmarks/gpu_session.sh all [...]    install once, check (300 s at most), then bench with the extra args
#                                               (default --minutes 3), then plan: one device call for a whole session
#
# The machine's image has torch, triton, pytest and pytest-benchmark; pure-Python packages it lacks
# (lycoris-lora 4.1.3, diffusers) come from .whl/ (../shared/device/wheels.sh), carried with the call.
set -euo pipefail
mode=${1:-check}
shift || true
out=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$out"

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/lyfast-site .whl/*.whl
  export PYTHONPATH=/tmp/lyfast-site:${PYTHONPATH:-}
fi
# Editable install without touching the image's torch; builds lyfast._C when nvcc is there. If that
# build fails, install without it (the Triton backend still runs; lyfast-cuda is then skipped).
export MAX_JOBS=${MAX_JOBS:-16}
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || {
  echo "install with the CUDA extension failed (see $out/install.log); installing without it"
  LYFAST_BUILD_CUDA=0 python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$out/install.log" 2>&1
}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$out/device.txt" 2>&1 || true
cat "$out/device.txt"

check() {
  local status=0
  timeout "${CHECK_SECONDS:-300}" python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_gpu_kernels.py -rs \
    > "$out/test_gpu_kernels.log" 2>&1 || status=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$out/test_gpu_kernels.log" | cut -c1-300 | tail -n 40
  return "$status"
}
bench() {
  python3 -m benchmarks --out "$out" "$@" > "$out/bench.log" 2>&1 || echo "benchmarks exited with $?"
  tail -n 30 "$out/bench.log"
  # The route model's efficiencies fitted to these timings (printed only; docs/gpu.md step 5 stores them).
  python3 -m benchmarks.recalibrate "$out"/*.json 2>&1 | tail -n 20 || true
}

planned() {
  # The plan traces on the CPU (about a minute per model), then the same step runs on the GPU.
  python3 -m benchmarks.plan_check --models sdxl,flux --device cuda --json "$out/plan_check.json" \
    > "$out/plan_check.log" 2>&1 || { tail -n 20 "$out/plan_check.log"; return 1; }
  grep '^{' "$out/plan_check.log"
}

case "$mode" in
  check)
    # The whole suite (412 cases at two backends) took ~9 minutes on an H200 (2026-11-30): it gets the call.
    CHECK_SECONDS=${CHECK_SECONDS:-540} check
    ;;
  aot)
    # The launch-specialized AOT report from the image's own Triton (CI covers Triton 3.6 for sm_90 already).
    python3 tests/launch_signatures.py --out "$out/triton_aot_resources_device.json" --workers 8 \
      > "$out/aot.log" 2>&1 || { tail -n 20 "$out/aot.log"; exit 1; }
    tail -n 3 "$out/aot.log"
    ;;
  bench)
    bench "$@"
    ;;
  plan)
    planned || exit 1
    ;;
  all)
    status=0
    check || status=$?
    [ $# -gt 0 ] || set -- --minutes 3
    bench "$@"
    planned || status=1
    exit "$status"
    ;;
  *)
    echo "usage: $0 check|aot|bench|plan|all [benchmark args]" >&2
    exit 2
    ;;
esac
