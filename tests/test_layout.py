"""Repository layout constraints: one top-level import name, kernels/ and nodes/ never importable bare."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_pyproject_lists_every_package_folder() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "comfy_mm_interleaved").rglob("__init__.py")
        if "__pycache__" not in path.parts
    }
    found.add("comfy_mm_interleaved.kernels")
    assert listed == found, (
        f"pyproject [tool.setuptools] packages out of date: missing {found - listed}, extra {listed - found}"
    )
    assert config["package-dir"]["comfy_mm_interleaved.kernels"] == "kernels"


def test_library_imports_without_comfyui_and_exposes_no_bare_names(tmp_path: Path) -> None:
    out = run_python(
        "import sys, importlib.util\n"
        "import comfy_mm_interleaved, comfy_mm_interleaved.ops, comfy_mm_interleaved.kernels as k\n"
        "import comfy_mm_interleaved.models.mmfs\n"
        "print(k.__file__)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kernels', 'nodes', 'comfy_api', 'comfy')))\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else None)\n",
        cwd=tmp_path,
    )
    kernels_file, bare_modules, bare_kernels = out.strip().splitlines()
    assert Path(kernels_file) == REPO / "kernels" / "__init__.py"
    assert bare_modules == "[]"
    assert bare_kernels == "None" or not bare_kernels.startswith(str(REPO))


def test_plugin_root_loads_like_comfyui_under_any_folder_name(tmp_path: Path) -> None:
    # ComfyUI imports a pack folder as a package named after its path (dots replaced), then calls comfy_entrypoint.
    out = run_python(
        "import importlib.util, inspect, sys\n"
        f"root = {str(REPO)!r}\n"
        "name = '/somewhere/ComfyUI/custom_nodes/my_pack_x_v2'\n"
        "init = root + '/__init__.py'\n"
        "spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[root])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules[name] = module\n"
        "spec.loader.exec_module(module)\n"
        "import comfy_mm_interleaved\n"
        "print(comfy_mm_interleaved.__file__)\n"
        "print(inspect.iscoroutinefunction(module.comfy_entrypoint))\n"
        "print('nodes' in sys.modules, 'kernels' in sys.modules)\n",
        cwd=tmp_path,
    )
    library_file, is_coroutine, bare = out.strip().splitlines()
    assert Path(library_file) == REPO / "comfy_mm_interleaved" / "__init__.py"
    assert is_coroutine == "True"
    assert bare == "False False"
