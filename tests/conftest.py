"""Shared test fixtures: the golden parity folder and single-threaded torch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("MMI_NUM_THREADS", "1")))

# Kernel tests (tests/test_kernel_*.py) run the real Triton kernels on CPUs in Triton's interpreter. It must be
# chosen before triton is first imported (triton decorates its own library at import, and diffusers/dynamo import
# it early); it only affects code that launches Triton kernels. MMI_TEST_DEVICE=cuda runs them compiled on a GPU.
if os.environ.get("MMI_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    """Fixture folder: ``$MMI_GOLDEN_DIR`` or ``../shared/golden`` beside the repository."""
    env = os.environ.get("MMI_GOLDEN_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "golden"


class GoldenCase:
    """One ``<name>_case.{json,safetensors}`` pair."""

    def __init__(self, name: str) -> None:
        from safetensors.torch import load_file

        base = golden_dir()
        self.meta = json.loads((base / f"{name}_case.json").read_text(encoding="utf-8"))
        self.tensors = load_file(str(base / f"{name}_case.safetensors"))

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.tensors if k.startswith(prefix))


@pytest.fixture(scope="session")
def golden() -> Path:
    path = golden_dir()
    if not (path / "tiny_config.json").exists():
        raise FileNotFoundError(
            f"golden fixtures not found at {path}; set MMI_GOLDEN_DIR to a folder in the format of shared/golden"
        )
    return path


def load_case(name: str) -> GoldenCase:
    return GoldenCase(name)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, name: str = "") -> None:
    """``max|a - b| <= atol * max(1, max|expected|)`` with a readable message."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= atol * scale, f"{name}: max abs error {err:.3e} > {atol:.1e} * {scale:.3g}"
