#!/usr/bin/env bash
# One lent GPU, one command: train the embedded model further and measure the 13B offload beside it.
#
#   bash scripts/gpu_embedded_stage.sh            # on the GPU machine (diffusers/transformers wheels installed first)
#   bash scripts/gpu_embedded_stage.sh --dry-run  # on a CPU: the same stages at toy sizes, about 4 minutes
#
# Stages, each bounded by the time budget (GPU_STAGE_BUDGET seconds, default 560; a failing stage is reported and
# the others still run):
#   kernel  (KERNEL_STAGE=1, the GPU to itself) bench/kernel.py: the launch sweep with and without the forward's
#           metadata prefetch in bf16 and fp32, then the checked rows at the LLM-side shapes with the prefetch on
#   train   configs/train/embedded_shapestories_gpu.yaml from the shipped model for TRAIN_SECS seconds; then SIGTERM,
#           which saves a checkpoint after the current step (the loop never loses one)
#           (TRAIN_OVERRIDES: extra key=value overrides, e.g. a cosine schedule)
#   13b     (SKIP_13B=1 skips it) beside the training: bench/generate.py --gpu-13b, random bf16 13B weights, offload sequential at a 22 GiB
#           budget, then offload none; peak device memory per phase
#   export  the mean of the last three checkpoints -> a model folder (export-checkpoint)
#   trainbench (TRAIN_BENCH=1) beside the training: bench/train.py --device cuda (our loop vs a plain loop)
#   eval    a short ShapeStories eval of the exported model on the same device (EVAL_LIMIT documents, 0 skips it)
#   pack    into $OUT (at most 8 files of < 16 MiB): the model without its frozen VAE, the last checkpoint's weights,
#           the logs
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-${TMPDIR:-/tmp}/mmi_gpu_stage}"
WORK="${TMPDIR:-/tmp}/mmi_gpu_stage_work"
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK/logs"
LOGS="$WORK/logs"
RUN="$WORK/run"
MODEL="$WORK/model"
BUDGET="${GPU_STAGE_BUDGET:-560}"
START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }

if [ $DRY -eq 1 ]; then
    TRAIN_SECS="${TRAIN_SECS:-100}"
    TRAIN_ARGS=(train.cpu=true data.batch_size=8 train.num_workers=2 train.save_every=5 train.log_every=5)
    B13_ARGS=(--size tiny --device cpu --steps 2)
    EVAL_ARGS=(--device cpu --limit 4 --steps 5)
    export OMP_NUM_THREADS=1 MMI_NUM_THREADS=1
else
    TRAIN_SECS="${TRAIN_SECS:-400}"
    TRAIN_ARGS=()
    B13_ARGS=(--steps 4)
    EVAL_ARGS=(--device cuda --limit "${EVAL_LIMIT:-64}")
    export MMI_NUM_THREADS="${MMI_NUM_THREADS:-4}"
fi

echo "=== env ($(elapsed) s)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tail -n 2 || true
"$PY" -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
git log -1 --format='revision %H' 2>/dev/null || true
read -r -a EXTRA <<<"${TRAIN_OVERRIDES:-}"
TRAIN_ARGS+=("${EXTRA[@]}")

if [ $DRY -eq 0 ] && [ "${KERNEL_STAGE:-0}" = "1" ]; then
    kbench() {  # kbench NAME SECONDS ARGS...: one bench/kernel.py run, its tail printed
        local name=$1 secs=$2
        shift 2
        echo "=== kernel $name ($(elapsed) s)"
        timeout -k 5 "$secs" "$PY" bench/kernel.py --device cuda --json "$LOGS/kernel_$name.json" "$@" \
            >"$LOGS/kernel_$name.log" 2>&1
        echo "kernel $name rc=$?"
        tail -n 22 "$LOGS/kernel_$name.log"
    }
    kbench tune_bf16 50 --tune-only --tune-no-backward --tune-grid 4x2,8x2,4x4,8x4
    kbench tune_fp32 35 --tune-only --dtype float32 --tune-no-backward --tune-grid 4x4,8x4,8x8
    MMI_MSDA_PREFETCH=1 kbench rows_bf16_prefetch 60 --shapes llm_mmfs,llm_mmfs_causal --no-detr --no-mmfs
fi

train_for() {  # train_for SECONDS [ENV=VALUE ...]: the training run, SIGTERM after SECONDS (it saves, then stops)
    local secs=$1
    shift
    env "$@" timeout -s TERM -k 90 "$secs" "$PY" -m comfy_mm_interleaved train \
        --config configs/train/embedded_shapestories_gpu.yaml train.output_dir="$RUN" "${TRAIN_ARGS[@]}" \
        >>"$LOGS/train.log" 2>&1
}

echo "=== train for ${TRAIN_SECS} s, 13B beside it ($(elapsed) s)"
TRAIN_START=$(elapsed)
(
    train_for "$TRAIN_SECS"
    rc=$?
    echo "train rc=$rc at $(elapsed) s (124 = stopped by the time limit, as planned)"
    left=$((TRAIN_START + TRAIN_SECS + 5 - $(elapsed)))
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ "$left" -gt 60 ]; then  # a crash: once more on the pure-PyTorch op
        echo "=== train again with MMI_MSDA_BACKEND=gather MMI_MMFS_FUSED=0 for ${left} s"
        train_for "$left" MMI_MSDA_BACKEND=gather MMI_MMFS_FUSED=0
        echo "train (retry) rc=$? at $(elapsed) s"
    fi
) &
TRAIN_PID=$!
(
    if [ "${SKIP_13B:-0}" = "1" ]; then
        echo "13b: skipped (SKIP_13B=1)"
        exit 0
    fi
    for mode in sequential none; do
        left=$((BUDGET - 120 - $(elapsed)))
        [ "$left" -lt 30 ] && { echo "13b $mode: skipped (time)"; continue; }
        echo "=== 13b offload=$mode (limit ${left}s, at $(elapsed) s)"
        timeout -k 10 "$left" "$PY" bench/generate.py --gpu-13b --offload "$mode" --budget-gib 22 "${B13_ARGS[@]}" \
            --json "$LOGS/13b_$mode.json"
        echo "13b $mode: rc=$?"
    done
) >"$LOGS/13b.log" 2>&1 &
B13_PID=$!
if [ $DRY -eq 0 ] && [ "${TRAIN_BENCH:-0}" = "1" ]; then
    (
        echo "=== bench/train.py on the GPU, beside the training ($(elapsed) s)"
        timeout -k 5 150 "$PY" bench/train.py --device cuda --steps 20 --warmup 3 --batch 8 --repeats 2
        echo "trainbench rc=$?"
    ) >"$LOGS/trainbench.log" 2>&1 &
fi
wait "$TRAIN_PID"
grep -E "samples_per_s|stopped|finished|Error" "$LOGS/train.log" | tail -n 6
tail -n 2 "$LOGS/train.log"

echo "=== export ($(elapsed) s)"
mapfile -t CKPTS < <(ls -d "$RUN"/checkpoints/step_* 2>/dev/null | grep -v '\.tmp$' | sort | tail -n 3)
if [ ${#CKPTS[@]} -gt 0 ]; then
    "$PY" -m comfy_mm_interleaved export-checkpoint "${CKPTS[@]}" --base comfy_mm_interleaved/embedded \
        --out "$MODEL" >"$LOGS/export.log" 2>&1
    echo "export rc=$? from ${CKPTS[*]##*/}"
else
    echo "export: no checkpoint"
fi

echo "=== eval ($(elapsed) s)"
left=$((BUDGET - 25 - $(elapsed)))
if [ -f "$MODEL/config.json" ] && [ "$left" -gt 20 ] && [ "${EVAL_LIMIT:-64}" != "0" ]; then
    timeout -k 5 "$left" "$PY" -m comfy_mm_interleaved eval shapes --model "$MODEL" --ablation off --no-progress \
        --out "$WORK/eval" "${EVAL_ARGS[@]}" >"$LOGS/eval.log" 2>&1
    echo "eval rc=$?"
    tail -n 12 "$LOGS/eval.log"
else
    echo "eval: skipped (no model or no time: ${left} s)"
fi

kill "$B13_PID" 2>/dev/null
wait "$B13_PID" 2>/dev/null
cat "$LOGS/13b.log"

wait
cat "$LOGS/trainbench.log" 2>/dev/null | tail -n 12

echo "=== pack ($(elapsed) s)"
cp "$RUN/metrics.csv" "$LOGS/" 2>/dev/null
cp "$WORK/eval/"*.json "$LOGS/" 2>/dev/null
if [ -f "$MODEL/config.json" ]; then
    tar -C "$WORK" --exclude='vae-*.safetensors' -cf - model | split -b 15000000 -d - "$OUT/model.tar.part"
fi
LAST=$(ls -d "$RUN"/checkpoints/step_* 2>/dev/null | grep -v '\.tmp$' | sort | tail -n 1)
[ -n "$LAST" ] && split -b 15000000 -d "$LAST/model.safetensors" "$OUT/last_${LAST##*_}.safetensors.part"
tar -C "$WORK" -czf "$OUT/logs.tar.gz" logs
ls -la "$OUT"
echo "=== done at $(elapsed) s"
