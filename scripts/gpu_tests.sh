#!/usr/bin/env bash
# Every `gpu` test of the suite on one GPU in about 7 minutes, as parallel pytest processes
# (XLA compiles dominate them and use the CPU cores), one log each, a summary at the end.
#
#   bash scripts/gpu_tests.sh [LOG_DIR]        # LOG_DIR: $OUT on the device machine, or ./gpu_logs
#
# Phase 1 runs the 64k-token strong-decay gradient test (~4 min alone on an H200) beside the
# other SSD tests; phase 2 the Mosaic GPU SSD tests, whose gradient test ran out of GPU memory
# beside the 64k one. Each process is stopped after T seconds (default 300; SIGINT, so pytest
# still writes what finished). The exit status is 1 if any group failed or timed out.
set -u
cd "$(dirname "$0")/.."
LOGS=${1:-${OUT:-gpu_logs}}
T=${T:-300}
mkdir -p "$LOGS"
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
STATUS="$LOGS/status.txt"
: > "$STATUS"
run() {  # run NAME PYTEST-ARGS...
    local name=$1; shift
    timeout -k 10 -s INT "$T" python -m pytest -v -rA --durations=0 -p no:cacheprovider -m gpu \
        "$@" > "$LOGS/$name.log" 2>&1
    echo "$name rc=$?" >> "$STATUS"
}
SSD=tests/kernels/test_ssd_pallas.py
run ssd_64k_grads $SSD -k "gradients_are_finite" &
run ssd_forward $SSD -k "test_gpu_real_sizes or strong_decay_is_stable" &
run ssd_backward_3000 $SSD -k "backward_real_sizes and 3000" &
run ssd_backward_4096 $SSD -k "backward_real_sizes and 4096" &
run ssd_backward_varlen $SSD -k "backward_real_sizes and 5000" &
run other_kernels tests/kernels/test_gemv.py tests/kernels/test_state_update_pallas.py \
    tests/kernels/test_state_update_mgpu.py tests/kernels/test_mixer_step.py \
    tests/kernels/test_rms_norm.py tests/kernels/test_residual_gemv.py \
    tests/kernels/test_conv1d_prefill_pallas.py \
    tests/kernels/test_conv1d_update_pallas.py tests/sharding/test_mesh_gpu.py &
wait
run ssd_mosaic_gpu tests/kernels/test_ssd_mgpu.py tests/kernels/test_ssd_mgpu_dc.py
cat "$STATUS"
for f in "$LOGS"/*.log; do
    echo "== $f"
    grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed)" "$f" | tail -20
done
! grep -qv "rc=0$" "$STATUS"
