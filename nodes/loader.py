"""Load model node and the model handle that travels through ``MMI_MODEL`` sockets.

Model management (device ``auto``): the engine's model (a ``torch.nn.Module``) is wrapped in ComfyUI's
``ModelPatcher`` with ComfyUI's torch device as load device and its model offload device as home. Every node that
runs the model first calls :meth:`LoadedModel.engine_ready`, which asks ``comfy.model_management.load_models_gpu``
to bring it onto the device (unloading other models when memory is short); between runs ComfyUI may offload it
(``/free``, other models) as it does its own checkpoints, and the engine's device-side caches (image features,
the last document's KV cache) are dropped with it. The load is a full one: the model's layers are ordinary torch
modules, not ComfyUI's weight-casting ops, so they cannot run half loaded. When the model's device changes, the
engine is re-created around the same weights (its placement and caches belong to a device).

Device ``sequential offload`` lets the engine itself keep the weights in RAM and stream LLM layers onto the GPU
(least VRAM; ComfyUI does not see that memory); ``cpu`` runs everything on the CPU. Devices come from
``comfy.model_management``; no device is hard-coded anywhere.

Loaded models are shared through a module-level weak cache keyed by (folder, weights file time, dtype, device
mode): two loader nodes, or two workflows, asking for the same model get the same one, and it is freed as soon
as ComfyUI drops the last node output that holds it.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import comfy.model_management
import comfy.model_patcher
import torch
from comfy.patcher_extension import CallbacksMP
from comfy_api.latest import io

from comfy_mm_interleaved.inference import InterleavedEngine, resolve_model_dir

from . import model_folder
from .types import CATEGORY, MMIModel

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MODES = ("auto", "cpu", "sequential offload")


class LoadedModel:
    """What an ``MMI_MODEL`` socket carries: the engine and, in ``auto`` mode, its ComfyUI ``ModelPatcher``."""

    def __init__(
        self,
        engine: InterleavedEngine,
        patcher: comfy.model_patcher.ModelPatcher | None,
        name: str,
        dtype: str,
        device_mode: str,
    ) -> None:
        self.engine = engine
        self.patcher = patcher
        self.name, self.dtype, self.device_mode = name, dtype, device_mode
        if patcher is not None:
            handle = weakref.ref(self)  # no reference cycle through the patcher's callbacks

            def drop_device_caches(_: object, unpatch_all: bool) -> None:
                # load_models_gpu also detaches softly (unpatch_all=False) while re-registering a loaded model
                loaded = handle()
                if unpatch_all and loaded is not None:
                    loaded.engine.clear_cache()

            patcher.add_callback(CallbacksMP.ON_DETACH, drop_device_caches)

    def engine_ready(self) -> InterleavedEngine:
        """The engine with its weights on the device it computes on (through ComfyUI's model management)."""
        if self.patcher is None:
            return self.engine
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        if self.patcher.model.model_lowvram:
            raise RuntimeError(
                "ComfyUI loaded the MM-Interleaved model only partially (low-VRAM mode), which this model cannot "
                "run; choose device 'sequential offload' or 'cpu' in the 'Load MM-Interleaved model' node"
            )
        device = self.patcher.load_device
        if set(self.engine.placement.devices.values()) != {torch.device(device)}:
            self.engine = InterleavedEngine(self.engine.model, self.engine.tokenizer)
        return self.engine

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, dtype={self.dtype}, device={self.device_mode})"


_LOADED: weakref.WeakValueDictionary[tuple, LoadedModel] = weakref.WeakValueDictionary()


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto``: float32 on the CPU, bfloat16 where the accelerator supports it, else float32."""
    if dtype != "auto":
        return dtype
    if device.type == "cpu":
        return "float32"
    return "bfloat16" if comfy.model_management.should_use_bf16(device) else "float32"


def _weights_time(folder: Path) -> float:
    index = folder / model_folder.MARKER_FILES[1]
    return index.stat().st_mtime if index.exists() else 0.0


def load_model(name: str, dtype: str = "auto", device_mode: str = "auto") -> LoadedModel:
    """The shared ``LoadedModel`` for these choices (loaded on first use)."""
    if device_mode not in DEVICE_MODES:
        raise ValueError(f"unknown device mode {device_mode!r}; choose one of {list(DEVICE_MODES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    folder = resolve_model_dir(model_folder.model_path(name))
    compute = torch.device("cpu") if device_mode == "cpu" else comfy.model_management.get_torch_device()
    dtype = resolve_dtype(dtype, compute)
    key = (str(folder.resolve()), _weights_time(folder), dtype, device_mode)
    loaded = _LOADED.get(key)
    if loaded is not None:
        return loaded
    if device_mode == "auto":
        home = comfy.model_management.unet_offload_device()
        engine = InterleavedEngine.from_pretrained(folder, dtype=dtype, device=home)
        patcher = comfy.model_patcher.ModelPatcher(engine.model, load_device=compute, offload_device=home)
    else:
        offload = device_mode == "sequential offload"
        engine = InterleavedEngine.from_pretrained(folder, dtype=dtype, device=compute, offload=offload)
        patcher = None
    loaded = LoadedModel(engine, patcher, name, dtype, device_mode)
    _LOADED[key] = loaded
    return loaded


class LoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMI_LoadModel",
            display_name="Load MM-Interleaved model",
            category=f"{CATEGORY}/loaders",
            description="Loads an MM-Interleaved model folder (nothing is ever downloaded).",
            inputs=[
                io.Combo.Input(
                    "model",
                    options=model_folder.model_names(),
                    default=model_folder.EMBEDDED,
                    tooltip="A model folder under ComfyUI/models/mm_interleaved/ (or an extra model path), or the "
                    "small ShapeStories model embedded in the pack.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=list(DTYPES),
                    default="auto",
                    tooltip="Weight precision. auto: float32 on the CPU, bfloat16 on GPUs that support it.",
                ),
                io.Combo.Input(
                    "device",
                    options=list(DEVICE_MODES),
                    default="auto",
                    tooltip="auto: ComfyUI's device, loaded and offloaded by ComfyUI's model management like its "
                    "own models. cpu: always on the CPU. sequential offload: weights stay in RAM and LLM layers "
                    "visit the GPU only while they run (least VRAM, slower).",
                ),
            ],
            outputs=[MMIModel.Output(display_name="model", tooltip="The loaded model.")],
        )

    @classmethod
    def validate_inputs(cls, model: str) -> bool | str:
        # see check_choice: a model this installation lacks is refused when the prompt is queued (dtype and device
        # are checked when it runs: ComfyUI would file one message under every input named here)
        names = model_folder.model_names()
        if model is not None and model not in names:  # None: the value arrives through a link
            return model_folder.missing_model_message(model, names)
        return True

    @classmethod
    def execute(cls, model: str, dtype: str, device: str) -> io.NodeOutput:
        return io.NodeOutput(load_model(model, dtype, device))
