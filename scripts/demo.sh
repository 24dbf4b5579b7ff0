#!/usr/bin/env bash
# The README's first command: set everything up and run the main job.
# The main job: convert the tiny official-format checkpoint (../shared/golden, or $MMI_GOLDEN_DIR) with our
# converter, then run the interleaved-story workflow in a real headless ComfyUI 0.3.75 on it, writing the images
# and an HTML page of the interleaved result into output/comfyui/. (Once the embedded ShapeStories model ships,
# the workflow runs on it instead and the conversion step goes away.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
golden="${MMI_GOLDEN_DIR:-../shared/golden}"
if [ ! -d "$golden/mm_interleaved_pretrain_tiny" ]; then
    echo "demo: no tiny official checkpoint at $golden/mm_interleaved_pretrain_tiny (set MMI_GOLDEN_DIR)" >&2
    exit 2
fi
mkdir -p output
.venv/bin/python -m comfy_mm_interleaved convert-official "$golden/mm_interleaved_pretrain_tiny" output/tiny-official \
    --config "$golden/tiny_config.json" --dtype float32
.venv/bin/python -m comfy_mm_interleaved info output/tiny-official
bash scripts/setup_comfyui.sh > /dev/null
echo "demo: running workflows/interleaved_story.json in a headless ComfyUI (CPU)..." >&2
.venv/bin/python -m tests.comfyui_harness run interleaved_story --output output/comfyui --tiny-from output/tiny-official
echo "demo: outputs (images + HTML page) are in $(pwd)/output/comfyui" >&2
