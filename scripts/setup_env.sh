#!/usr/bin/env bash
# Create (or update) the project's virtual environment at .venv/ and install the project into it.
# Idempotent: re-running only reinstalls when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version 2>&1)" >&2
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.mmi-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # torch 2.14.1 for x86_64 is a CUDA build (it runs on the CPU): about 5.5 GB in the venv. Say so up front
    # instead of failing half-way with pip's "No space left on device".
    need_gib="${MMI_SETUP_NEED_GIB:-7}"
    free_gib="$(df -Pk . 2>/dev/null | awk 'NR==2 {printf "%d", $4 / 1048576}')"
    tmp_free_gib="$(df -Pk "${TMPDIR:-/tmp}" 2>/dev/null | awk 'NR==2 {printf "%d", $4 / 1048576}')"
    free_gib="${free_gib:-unknown}" tmp_free_gib="${tmp_free_gib:-unknown}"  # no df: no check
    if [ ! -f "$stamp" ] && [ "$free_gib" != unknown ] && [ "$free_gib" -lt "$need_gib" ]; then
        echo "[setup] error: installing needs about $need_gib GiB free for .venv in $(pwd), but only $free_gib GiB is free." >&2
        echo "[setup] Free some disk space (old virtual environments, pytest's temporary folders) and run this again," >&2
        echo "[setup] or set MMI_SETUP_NEED_GIB to a smaller number if you know the install fits." >&2
        exit 1
    fi
    echo "[setup] installing comfy_mm_interleaved and its pinned dependencies into .venv (first time: a few minutes;" \
        "$free_gib GiB free here, $tmp_free_gib GiB in ${TMPDIR:-/tmp})" >&2
    # --no-cache-dir: a wheel fetched from a registry is not kept a second time in pip's cache.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir -c constraints.txt -e ".[dev]"
    echo "$want" > "$stamp"
fi
echo "[setup] .venv ready: $(.venv/bin/python -c 'import torch, transformers, diffusers; print("torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)')" >&2
