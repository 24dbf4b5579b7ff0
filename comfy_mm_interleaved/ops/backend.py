"""Which implementation of the deformable-sampling op runs, chosen per call from the environment.

``MMI_MSDA_BACKEND`` (read at every call, so tests and benchmarks can switch it):

* ``auto`` (default): Triton on CUDA when Triton is importable, the gather fallback everywhere else.
* ``reference``: the ``grid_sample`` oracle (:mod:`.reference`), differentiated by autograd. Slow; for debugging.
* ``gather``: the custom op with the pure-PyTorch gather implementation, on every device.
* ``triton``: the custom op with the Triton kernels. On a CPU this needs ``TRITON_INTERPRET=1`` (the Triton
  interpreter, set before Triton is first imported); it is how the tests run the real kernels without a GPU.

``MMI_MMFS_FUSED`` (``auto`` default, ``0`` off): MMFS uses its fused Triton path (softmax, locations and
sampling in one kernel) whenever the op's backend for the values' device is ``triton``.

Triton is imported lazily (only when a Triton path is about to run), so importing the library never imports it
and ``TRITON_INTERPRET`` may still be set after ``import comfy_mm_interleaved``.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "gather", "triton")


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def requested_backend() -> str:
    """The value of ``MMI_MSDA_BACKEND`` (``auto`` when unset), validated."""
    name = os.environ.get("MMI_MSDA_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MMI_MSDA_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can launch on tensors of ``device``."""
    if not triton_importable():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def backend_for(device: torch.device) -> str:
    """The implementation that runs for tensors on ``device``: ``reference``, ``gather`` or ``triton``."""
    name = requested_backend()
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_runs_on(device) else "gather"
    if name == "triton" and not triton_runs_on(device):
        raise RuntimeError(
            f"MMI_MSDA_BACKEND=triton cannot run on {device.type} tensors: Triton "
            + ("is not installed" if not triton_importable() else "needs CUDA, or TRITON_INTERPRET=1 on a CPU")
            + "; unset MMI_MSDA_BACKEND to use the gather fallback"
        )
    return name


def mmfs_fused_enabled(device: torch.device) -> bool:
    """Whether MMFS takes its fused Triton path for values on ``device``."""
    if os.environ.get("MMI_MMFS_FUSED", "auto").strip().lower() in ("0", "off", "false", "no"):
        return False
    return backend_for(device) == "triton"
