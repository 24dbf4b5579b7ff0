#!/usr/bin/env bash
# The README's first command: set everything up and run the main job.
# Until the embedded ShapeStories model and the ComfyUI demo workflow exist, the main job converts the tiny
# official-format checkpoint (../shared/golden, or $MMI_GOLDEN_DIR) with our converter into output/ and prints
# what it contains.
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
echo "demo: converted model written to $(pwd)/output/tiny-official" >&2
