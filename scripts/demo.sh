#!/usr/bin/env bash
# The README's first command: set everything up and run the main job.
# The main job: the interleaved-story workflow (workflows/interleaved_story.json) in a real headless ComfyUI 0.3.75
# on the embedded ShapeStories model that ships in comfy_mm_interleaved/embedded/ (nothing is downloaded), writing
# the images and an HTML page of the interleaved result into output/comfyui/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p output
.venv/bin/python -m comfy_mm_interleaved info comfy_mm_interleaved/embedded
bash scripts/setup_comfyui.sh > /dev/null
echo "demo: running workflows/interleaved_story.json in a headless ComfyUI (CPU) on the embedded model..." >&2
.venv/bin/python -m tests.comfyui_harness run interleaved_story --output output/comfyui
echo "demo: outputs (images + HTML page) are in $(pwd)/output/comfyui" >&2
