"""``convert-inception SRC.pth DST.safetensors``: the standard FID Inception weights as a safetensors file, once.

The source is pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (the TF 2015-12-05 Inception graph as a
PyTorch state dict; torch-fidelity ships the same tensors). This module is the only place that reads it, with
``torch.load(weights_only=True)`` (no code from the file runs); FID runs read the safetensors file only.

What is converted: every tensor of :class:`~.inception.FIDInceptionV3` under its own name, as float32. Dropped: the
1008-way classifier ``fc.weight`` / ``fc.bias`` (FID uses the pool features before it). Batch-norm counters
``num_batches_tracked`` that the file lacks are written as 0 (they do not affect evaluation). A classifier with
another number of classes (torchvision's ImageNet Inception has 1000) means the wrong weights: an error.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from .inception import WEIGHTS_HELP, WEIGHTS_NAME, FIDInceptionV3, check_state_dict

STANDARD_SHA256_PREFIX = "6726825d"  # the hash prefix in the standard file's name (torch hub convention)
CLASSIFIER = ("fc.weight", "fc.bias")
FID_CLASSES = 1008
COUNTER_SUFFIX = ".num_batches_tracked"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_inception_pth(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of the ``.pth`` file ``path`` (``weights_only=True``), with clear errors."""
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} not found; {WEIGHTS_HELP}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"{path} is not a readable PyTorch weights file ({err}); {WEIGHTS_HELP}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} does not hold a state dict (name -> tensor); {WEIGHTS_HELP}")
    return state_dict


def fid_inception_state_dict(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The tensors of :class:`FIDInceptionV3` from the standard file's state dict (see the module docstring)."""
    classifier = state_dict.get("fc.weight")
    if classifier is not None and classifier.shape[0] != FID_CLASSES:
        raise ValueError(
            f"{source} has a {classifier.shape[0]}-class classifier: these are not the FID Inception weights (the "
            f"2015-12-05 graph has {FID_CLASSES} classes; torchvision's ImageNet Inception is a different network); "
            + WEIGHTS_HELP
        )
    model = FIDInceptionV3()
    tensors = {k: v for k, v in state_dict.items() if k not in CLASSIFIER}
    for name, buffer in model.state_dict().items():
        if name.endswith(COUNTER_SUFFIX) and name not in tensors:
            tensors[name] = torch.zeros_like(buffer)
    check_state_dict(tensors, model, source)
    return {
        k: v.to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone() for k, v in tensors.items()
    }


def convert_inception(
    src: str | Path, dst: str | Path, overwrite: bool = False, log: Callable[[str], None] | None = None
) -> Path:
    """Write the FID Inception weights of ``src`` (``.pth``) to the safetensors file ``dst``; returns ``dst``."""
    from safetensors.torch import save_file

    log = log or (lambda message: None)
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise ValueError(f"{dst} already exists; pass --overwrite to replace it")
    if dst.suffix != ".safetensors":
        raise ValueError(f"the destination must be a .safetensors file, got {dst}")
    sha256 = file_sha256(src) if src.is_file() else ""
    tensors = fid_inception_state_dict(read_inception_pth(src), str(src))
    if not sha256.startswith(STANDARD_SHA256_PREFIX):
        log(
            f"note: {src} is not the standard {WEIGHTS_NAME} (SHA-256 {sha256[:16]}...); FIDs computed with it are "
            "not comparable with published numbers"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    temporary = dst.with_name(dst.name + ".tmp")
    metadata = {"format": "fid-inception-v3-2015-12-05", "source": src.name, "source_sha256": sha256}
    save_file(tensors, str(temporary), metadata=metadata)
    temporary.replace(dst)
    return dst
