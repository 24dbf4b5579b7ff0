#!/usr/bin/env bash
# One-shot GPU check of the deformable-sampling op, from the repository root on a bare GPU machine (~6 minutes).
#
#   bash bench/gpu_check.sh            # on the GPU machine; carry .device/ (Deformable-DETR sources, golden copy)
#   bash bench/gpu_check.sh --dry-run  # on a CPU: the same stages at toy sizes (Triton in its interpreter)
#
# Stages, each guarded by a timeout (a failing stage is reported and the others still run):
#   env      GPU, torch, triton; importing comfy_mm_interleaved.ops must not import diffusers/transformers
#   detr     build Deformable-DETR's CUDA op in the background (sources in .device/deformable_detr_ops, not in git)
#   tests    the kernel / op / MMFS tests compiled on CUDA (MMI_TEST_DEVICE=cuda: no interpreter)
#   checks   fp32 and fp16 checks of every implementation against the reference at the realistic shapes
#            (bench/kernel.py --check-only; the bf16 check is part of the bench stage)
#   bench    bench/kernel.py in bf16, with Deformable-DETR's op (fp32) when it built; table last
#   tune     BLOCK_Q x num_warps sweep of the plain Triton kernels at the LLM-side shape
#   split    the forward's locality options (levels per program x query blocks per program, msda_forward's
#            group_levels / q_iters) at the LLM-side shapes, bf16, each checked against the plain forward first
# STAGES (comma-separated, default "env,tests,checks,bench,tune") picks the stages, e.g. the forward-locality session:
#   STAGES=env,tests,split bash bench/gpu_check.sh      (about 4 minutes; detr is built only for the bench stage)
# Logs (and kernel_bench.json) go to $OUT when it is set, else to $TMPDIR/mmi_gpu_check. The project needs no
# install: PYTHONPATH=$PWD and comfy_mm_interleaved/__init__.py exposes kernels/ as comfy_mm_interleaved.kernels.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MMI_NUM_THREADS="${MMI_NUM_THREADS:-8}"
PY="${PYTHON:-python3}"
# golden fixtures: ../shared/golden beside the checkout, else the copy carried in .device/golden (not in git)
if [ -z "${MMI_GOLDEN_DIR:-}" ] && [ ! -f ../shared/golden/msda_case.json ] && [ -f .device/golden/msda_case.json ]; then
    export MMI_GOLDEN_DIR="$PWD/.device/golden"
fi
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
LOG="${OUT:-${TMPDIR:-/tmp}/mmi_gpu_check}"
mkdir -p "$LOG"
DETR_BUILD="${TMPDIR:-/tmp}/mmi_detr_ops_build"
SUMMARY=()
STAGES="${STAGES:-env,tests,checks,bench,tune}"
want() { [[ ",$STAGES," == *",$1,"* ]]; }

SCRIPT_START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-560}"  # seconds for all stages, so the summary prints inside a 600 s device command

run_stage() {  # run_stage NAME SECONDS COMMAND...: log to $LOG/<NAME up to a "-">.log, keep its tail, record the status
    local name=$1 limit=$2 start rc log left
    shift 2
    log="$LOG/${name%%-*}.log"
    start=$(date +%s)
    left=$((BUDGET - (start - SCRIPT_START)))
    if [ "$left" -lt 20 ]; then
        SUMMARY+=("$(printf '%-15s %-36s' "$name" "SKIPPED (time budget spent)")")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s): $*" >>"$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    tail -n 30 "$log"
    local verdict=ok
    [ $rc -ne 0 ] && verdict="FAILED (rc=$rc$([ $rc -eq 124 ] && echo ', timed out'))"
    SUMMARY+=("$(printf '%-15s %-36s %4ss' "$name" "$verdict" "$(($(date +%s) - start))")")
}
rm -f "$LOG"/{env,detr,tests,checks,bench,tune,split}.log "$LOG/summary.txt"

if [ $DRY -eq 1 ]; then
    DEVICE_ARGS=(--device cpu --scale 0.002 --warmup 0 --repeats 1 --no-detr)
    TEST_DEVICE=cpu
    TESTS=(tests/test_kernel_msda.py tests/test_mmfs_parity.py)
else
    DEVICE_ARGS=(--device cuda)
    TEST_DEVICE=cuda
    TESTS=(tests/test_kernel_msda.py tests/test_kernel_mmfs_fused.py tests/test_ops_msda.py tests/test_mmfs_parity.py)
fi

env_check() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
    "$PY" - <<'EOF'
import sys
import torch
import comfy_mm_interleaved.ops  # noqa: F401
import comfy_mm_interleaved.models.mmfs  # noqa: F401
import comfy_mm_interleaved.kernels  # noqa: F401  (the source-checkout mapping of kernels/)
heavy = [m for m in ("diffusers", "transformers") if m in sys.modules]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton missing")
print("imports of diffusers/transformers by the ops:", heavy or "none")
import os
print("golden fixtures:", os.environ.get("MMI_GOLDEN_DIR", "../shared/golden"))
sys.exit(1 if heavy else 0)
EOF
}

export -f env_check
export PY
want env && run_stage env 30 bash -c env_check

if [ $DRY -eq 0 ] && want bench; then  # overlaps the nvcc build with the tests
    timeout 300 "$PY" bench/kernel.py --device cuda --build-detr-only --detr-build-dir "$DETR_BUILD" \
        >"$LOG/detr.log" 2>&1 &
    DETR_PID=$!
fi

want tests && run_stage tests 170 env MMI_TEST_DEVICE=$TEST_DEVICE "$PY" -m pytest -q -ra -p no:cacheprovider "${TESTS[@]}" \
    --deselect tests/test_ops_msda.py::test_ops_compiled_gather_opt_in --durations=8
# fp32 (and on a GPU fp16) checks of every implementation at the realistic shapes, without timing
want checks && run_stage checks-float32 100 "$PY" bench/kernel.py "${DEVICE_ARGS[@]}" --check-only --dtype float32 --no-detr \
    --json "${TMPDIR:-/tmp}/mmi_check_float32.json"
if [ $DRY -eq 0 ] && want checks; then  # (grid_sample has no fp16 CPU kernel)
    run_stage checks-float16 70 "$PY" bench/kernel.py "${DEVICE_ARGS[@]}" --check-only --dtype float16 \
        --no-detr --no-mmfs --json "${TMPDIR:-/tmp}/mmi_check_float16.json"
fi

BENCH_DETR=(--detr-build-dir "$DETR_BUILD")
if [ $DRY -eq 0 ] && want bench; then
    wait "$DETR_PID"
    detr_rc=$?
    echo "Deformable-DETR op build rc=$detr_rc: $(tail -n 1 "$LOG/detr.log")"
    [ $detr_rc -ne 0 ] && BENCH_DETR=(--no-detr)  # do not retry a failed build inside the timed stage
fi
want bench && run_stage bench 180 "$PY" bench/kernel.py "${DEVICE_ARGS[@]}" "${BENCH_DETR[@]}" \
    --json "$LOG/kernel_bench.json"
[ $DRY -eq 0 ] && want tune && run_stage tune 80 "$PY" bench/kernel.py --device cuda --tune-only --no-detr
if want split; then
    SPLITS="${SPLITS:-0x1,3x1,3x2,3x4,6x1,6x2,0x2,0x4,24x1}"
    SPLIT_GRID="${SPLIT_GRID:-8x2,4x4}"
    SPLIT_ARGS=(--device cuda)
    SPLIT_SHAPES=(llm_mmfs llm_mmfs_causal)
    if [ $DRY -eq 1 ]; then  # one configuration at a toy size: the interpreter takes about 10 s per call
        SPLITS=3x2 SPLIT_GRID=4x4 SPLIT_ARGS=(--device cpu --scale 0.002 --repeats 1 --warmup 0)
        SPLIT_SHAPES=(llm_mmfs_causal)
    fi
    for shape in "${SPLIT_SHAPES[@]}"; do
        run_stage "split-$shape" 90 env TRITON_INTERPRET=$DRY "$PY" bench/kernel.py "${SPLIT_ARGS[@]}" --tune-only \
            --no-detr --tune-no-backward --tune-shape "$shape" --tune-grid "$SPLIT_GRID" --tune-split "$SPLITS" \
            --json "$LOG/kernel_split_$shape.json"
    done
fi

{
    echo
    echo "=== gpu_check summary (logs in $LOG)"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    [ -f "$LOG/tune.log" ] && grep -A16 "sweep" "$LOG/tune.log"
    [ -f "$LOG/split.log" ] && grep -A24 "sweep" "$LOG/split.log"
    if grep -q '^SUMMARY$' "$LOG/bench.log" 2>/dev/null; then
        sed -n '/^SUMMARY$/,$p' "$LOG/bench.log"
    else
        tail -n 25 "$LOG/bench.log" 2>/dev/null
    fi
} | tee "$LOG/summary.txt"
