"""Where the weights live during generation: dtype, per-group devices, offloading, peak memory, size estimates.

The model's checkpoint components form three groups that must each sit on one device (their forward code passes
tensors between the members without moving them):

    vision    = visual_tokenizer                                  (phase "encode")
    language  = llm, text_decoder, connector                      (phase "text": prompts, tokens, image context)
    diffusion = image_decoder, unet, unet_mmfs, vae               (phase "image": diffusion sampling)

``device`` is one device for everything, or a map whose keys are group or component names (members of a group must
agree), e.g. ``{"language": "cuda:0", "vision": "cpu", "diffusion": "cuda:1"}``. The VAE always runs in float32, as
in the official pipeline; everything else uses ``dtype``.

Offloading (``offload``) keeps the weights in (pinned) CPU memory and computes on one execution device:

* ``"model"``: a group is copied to the device when its phase starts and dropped (weights never change, so dropping
  is free) only when another group needs the room; needs the largest group to fit (language: 26.7 GB in bf16 for
  the 13B model).
* ``"sequential"``: as ``"model"``, but only ``resident_layers`` decoder layers of the LLM stay on the device; the
  others are streamed in before their forward and dropped after it. This is what fits the 13B model on a 24 GB GPU.
* ``True``: ``"sequential"`` with as many resident layers as the device's free memory allows.

On a CPU execution device offloading changes nothing and is switched off.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint import COMPONENTS, _is_fixed_table, build_empty_model, component_of, parse_dtype
from ..config import MMInterleavedConfig
from ..models.unet_mmfs import unet_skip_channels

GROUPS: dict[str, tuple[str, ...]] = {
    "vision": ("visual_tokenizer",),
    "language": ("llm", "text_decoder", "connector"),
    "diffusion": ("image_decoder", "unet", "unet_mmfs", "vae"),
}
PHASE_GROUP = {"encode": "vision", "text": "language", "image": "diffusion"}
OFFLOAD_MODES = ("none", "model", "sequential")
FLOAT32_COMPONENTS = frozenset({"vae"})  # run in float32 whatever the model dtype (official VAE decode)
GIB = 2**30
UNET_ACTIVATION_ALLOWANCE = 2 * GIB  # assumed UNet + MMFSNet working set of one CFG step (to check on a GPU)


def group_of(component: str) -> str:
    return next(group for group, members in GROUPS.items() if component in members)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Placement:
    """Resolved memory options: dtype, the device of each group, offload mode and its execution device."""

    dtype: torch.dtype
    devices: dict[str, torch.device]  # group -> device (where it computes)
    offload: str = "none"
    execution_device: torch.device | None = None
    resident_layers: int | None = None  # sequential offload: LLM decoder layers kept on the device (None = auto)
    notes: list[str] = field(default_factory=list)

    def component_devices(self) -> dict[str, torch.device]:
        """Where each checkpoint component is loaded (the CPU when offloading)."""
        home = torch.device("cpu") if self.offload != "none" else None
        return {c: home or self.devices[group_of(c)] for c in COMPONENTS}

    def to_dict(self) -> dict:
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "devices": {g: str(d) for g, d in self.devices.items()},
            "offload": self.offload,
            "execution_device": None if self.execution_device is None else str(self.execution_device),
            "resident_layers": self.resident_layers,
            "notes": self.notes,
        }


def usable_device(value: str | torch.device) -> torch.device:
    """``value`` as a ``torch.device`` that this machine has; a clear error for a misspelt or absent device."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {value!r} ({err}); use e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {value!r}: torch sees no CUDA GPU on this machine; use 'cpu'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {value!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {value!r}: MPS is not available on this machine; use 'cpu'")
    return device


def _group_devices(device: str | torch.device | Mapping[str, str | torch.device] | None) -> dict[str, torch.device]:
    if device is None:
        return dict.fromkeys(GROUPS, default_device())
    if not isinstance(device, Mapping):
        return dict.fromkeys(GROUPS, usable_device(device))
    chosen: dict[str, dict[str, torch.device]] = {g: {} for g in GROUPS}
    for key, value in device.items():
        if key in GROUPS:
            for member in GROUPS[key]:
                chosen[key][member] = usable_device(value)
        elif key in COMPONENTS:
            chosen[group_of(key)][key] = usable_device(value)
        else:
            raise ValueError(
                f"unknown device-map key {key!r}; use a group {list(GROUPS)} or a component {list(COMPONENTS)}"
            )
    devices = {}
    for group, members in chosen.items():
        distinct = set(members.values())
        if len(distinct) > 1:
            raise ValueError(
                f"the {group} components {list(GROUPS[group])} must share one device, got "
                + ", ".join(f"{m}={d}" for m, d in members.items())
            )
        devices[group] = distinct.pop() if distinct else default_device()
    return devices


def resolve_placement(
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | Mapping[str, str | torch.device] | None = None,
    offload: bool | str = False,
    resident_layers: int | None = None,
) -> Placement:
    """Validate and resolve the memory options of :meth:`InterleavedEngine.from_pretrained`."""
    placement = Placement(parse_dtype(dtype), _group_devices(device), resident_layers=resident_layers)
    mode = {False: "none", True: "sequential", None: "none"}.get(offload, offload)
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload must be False, True or one of {OFFLOAD_MODES}, got {offload!r}")
    if resident_layers is not None and (not isinstance(resident_layers, int) or resident_layers < 0):
        raise ValueError(f"resident_layers must be an int >= 0, got {resident_layers!r}")
    if mode != "none":
        targets = set(placement.devices.values())
        if len(targets) > 1:
            raise ValueError(
                f"offload computes on one execution device; got a device map over {sorted(map(str, targets))}"
            )
        execution = targets.pop()
        if execution.type == "cpu":
            placement.notes.append("offload ignored: the execution device is the CPU, where the weights already are")
        else:
            placement.offload, placement.execution_device = mode, execution
    return placement


# ----------------------------------------------------------------------------------------------------------------
# Moving weights


def group_modules(model: nn.Module, group: str) -> list[nn.Module]:
    """The submodules of ``model`` (an ``MMInterleaved``) that hold a group's weights (``soi_token`` lives on the
    root and is handled by :func:`group_root_parameters`)."""
    parts = {
        "vision": [model.visual_tokenizer],
        "language": [model.mm_decoder, model.text_decoder, model.context_feat_proj],
        "diffusion": [model.image_decoder],
    }[group]
    return [p for p in parts if p is not None]


def group_root_parameters(model: nn.Module, group: str) -> list[nn.Parameter]:
    return [model.soi_token] if group == "language" else []


def _tensors(module: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor, bool]]:
    """(owner, name, tensor, is_parameter) of every parameter and buffer of ``module``."""
    out = []
    for sub in module.modules():
        out += [(sub, n, p, True) for n, p in sub.named_parameters(recurse=False)]
        out += [(sub, n, b, False) for n, b in sub.named_buffers(recurse=False) if b is not None]
    return out


class _Swappable:
    """Weights with a CPU master copy (pinned when the device is CUDA) that can be copied to the execution device
    and dropped again; inference never changes weights, so dropping needs no copy back."""

    def __init__(self, modules: Iterable[nn.Module], parameters: Iterable[nn.Parameter], device: torch.device):
        self.device = device
        self.entries: list[tuple[nn.Module | None, str, torch.Tensor, torch.Tensor, bool]] = []
        for module in modules:
            for owner, name, tensor, is_param in _tensors(module):
                self.entries.append((owner, name, tensor, self._master(tensor), is_param))
        for param in parameters:
            self.entries.append((None, "", param, self._master(param), True))
        self.nbytes = sum(master.numel() * master.element_size() for *_, master, _ in self.entries)
        self.loaded = True
        self.drop()  # the weights now live in their masters (the originals can be freed)

    def _master(self, tensor: torch.Tensor) -> torch.Tensor:
        master = tensor.detach().to("cpu")
        if self.device.type == "cuda":
            with contextlib.suppress(RuntimeError):  # pinning can fail when page-locked memory runs out
                master = master.pin_memory()
        return master

    def _assign(self, to_device: bool) -> None:
        for owner, name, tensor, master, is_param in self.entries:
            value = master.to(self.device, non_blocking=True) if to_device else master
            if is_param:
                tensor.data = value
            else:
                setattr(owner, name, value)  # registered buffer: nn.Module.__setattr__ updates it
        self.loaded = to_device

    def load(self) -> None:
        if not self.loaded:
            self._assign(True)

    def drop(self) -> None:
        if self.loaded:
            self._assign(False)


class Offloader:
    """Moves groups to the execution device per phase (LRU eviction within ``budget_bytes``) and streams the
    non-resident LLM decoder layers in ``"sequential"`` mode. A no-op when ``placement.offload == "none"``."""

    def __init__(self, model: nn.Module, placement: Placement, budget_bytes: int | None = None) -> None:
        self.placement = placement
        self.groups: dict[str, _Swappable] = {}
        self.streamed: list[_Swappable] = []
        self.order: list[str] = []  # loaded groups, least recently used first
        if placement.offload == "none":
            return
        device = placement.execution_device
        self.budget = budget_bytes if budget_bytes is not None else device_budget(device)
        layers = list(model.mm_decoder.layers)
        keep = len(layers)
        if placement.offload == "sequential":
            keep = placement.resident_layers
            if keep is None:
                keep = resident_layers_for_budget(model, self.budget)
            keep = min(keep, len(layers))
            placement.resident_layers = keep
        for group in GROUPS:
            modules = group_modules(model, group)
            if group == "language" and keep < len(layers):
                modules = _language_without_layers(model, keep)
            self.groups[group] = _Swappable(modules, group_root_parameters(model, group), device)
        for layer in layers[keep:]:
            streamed = _Swappable([layer], [], device)
            layer.register_forward_pre_hook(lambda module, args, s=streamed: s.load())
            layer.register_forward_hook(lambda module, args, output, s=streamed: s.drop())
            self.streamed.append(streamed)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        group = PHASE_GROUP[name]
        if self.placement.offload != "none":
            self._activate(group)
        yield

    @contextlib.contextmanager
    def loaded(self, modules: Iterable[nn.Module]) -> Iterator[None]:
        """Make streamed layers among ``modules``' ancestors available outside their forward (e.g. to project MMFS
        values with their weights)."""
        wanted = {id(p) for m in modules for p in m.parameters()}
        needed = [s for s in self.streamed if wanted & {id(t) for _, _, t, _, _ in s.entries}]
        for s in needed:
            s.load()
        try:
            yield
        finally:
            for s in needed:
                s.drop()

    def _activate(self, group: str) -> None:
        target = self.groups[group]
        if group in self.order:
            self.order.remove(group)
        else:
            while self.order and sum(self.groups[g].nbytes for g in self.order) + target.nbytes > self.budget:
                self.groups[self.order.pop(0)].drop()
            target.load()
        self.order.append(group)


def _language_without_layers(model: nn.Module, keep: int) -> list[nn.Module]:
    """The language group's modules except LLM decoder layers ``keep`` onwards (those are streamed)."""
    decoder = model.mm_decoder
    kept = [decoder.embed_tokens, decoder.norm, decoder.rotary_emb, *list(decoder.layers)[:keep]]
    return [*kept, model.text_decoder, model.context_feat_proj]


def device_budget(device: torch.device, reserve_bytes: int = int(1.5 * GIB)) -> int:
    """Bytes of weights the device may hold: its free memory minus a reserve for activations and caches."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, free - reserve_bytes)
    return sys.maxsize


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, _, t, _ in _tensors(module))


def resident_layers_for_budget(model: nn.Module, budget_bytes: int, runtime_bytes: int = 3 * GIB) -> int:
    """How many LLM decoder layers fit beside the rest of the language group and the largest other group (so
    that switching to diffusion or encoding never evicts the LLM), keeping ``runtime_bytes`` for KV cache and
    activations."""
    layers = list(model.mm_decoder.layers)
    fixed = sum(_nbytes(m) for m in _language_without_layers(model, 0)) + model.soi_token.numel() * 4
    other = max(sum(_nbytes(m) for m in group_modules(model, g)) for g in ("vision", "diffusion"))
    room = budget_bytes - fixed - other - runtime_bytes - max(_nbytes(layer) for layer in layers)
    count = 0
    for layer in layers:
        room -= _nbytes(layer)
        if room < 0:
            break
        count += 1
    return count


# ----------------------------------------------------------------------------------------------------------------
# Peak memory


class PeakMemory:
    """Peak memory per phase: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` on each CUDA device
    used (reset at each phase start), and the process's peak resident set size (never reset by the OS)."""

    def __init__(self, devices: Iterable[torch.device]) -> None:
        self.cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
        self.phases: dict[str, dict[str, dict[str, int]]] = {}  # phase -> device -> allocated / reserved

    @contextlib.contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        for device in self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        try:
            yield
        finally:
            record = self.phases.setdefault(phase, {})
            for device in self.cuda:
                peaks = record.setdefault(str(device), {"allocated": 0, "reserved": 0})
                peaks["allocated"] = max(peaks["allocated"], torch.cuda.max_memory_allocated(device))
                peaks["reserved"] = max(peaks["reserved"], torch.cuda.max_memory_reserved(device))

    def peak(self, kind: str = "allocated") -> dict[str, int]:
        """Per CUDA device, the largest peak over all phases."""
        return {
            str(d): max((p[str(d)][kind] for p in self.phases.values() if str(d) in p), default=0) for d in self.cuda
        }

    def report(self) -> dict:
        return {
            "cuda_peak_per_phase": self.phases,
            "cuda_peak_allocated_bytes": self.peak("allocated"),
            "cuda_peak_reserved_bytes": self.peak("reserved"),
            "process_peak_rss_bytes": process_peak_rss(),
        }


def process_peak_rss() -> int:
    """The process's peak resident set size in bytes: ``ru_maxrss`` on Linux and macOS, the peak working set on
    Windows (which has no ``resource`` module; psutil comes with accelerate)."""
    try:
        import resource
    except ImportError:
        import psutil

        memory = psutil.Process().memory_info()
        return int(getattr(memory, "peak_wset", memory.rss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ----------------------------------------------------------------------------------------------------------------
# Size estimates from the meta-device build


def _meta_sizes(config: MMInterleavedConfig, dtype: torch.dtype) -> tuple[dict[str, int], list[int]]:
    """(bytes per checkpoint component, bytes per LLM decoder layer) from one meta-device build."""
    model = build_empty_model(config)
    sizes = dict.fromkeys(COMPONENTS, 0)
    for key, tensor in model.state_dict().items():
        component = component_of(key)
        if not tensor.is_floating_point():
            itemsize = tensor.element_size()
        elif component in FLOAT32_COMPONENTS or _is_fixed_table(key):
            itemsize = 4
        else:
            itemsize = dtype.itemsize
        sizes[component] += tensor.numel() * itemsize
    layers = [sum(p.numel() * dtype.itemsize for p in layer.parameters()) for layer in model.mm_decoder.layers]
    return sizes, layers


def component_bytes(config: MMInterleavedConfig, dtype: str | torch.dtype = "bfloat16") -> dict[str, int]:
    """Bytes of every checkpoint component's weights in ``dtype`` as the engine holds them (VAE in float32, fixed
    position tables in float32), from a meta-device build (no memory is allocated)."""
    return _meta_sizes(config, parse_dtype(dtype))[0]


def runtime_bytes(
    config: MMInterleavedConfig,
    dtype: str | torch.dtype = "bfloat16",
    context_tokens: int | None = None,
    images: int = 8,
) -> dict[str, int]:
    """Caches and the largest activations of interleaved generation (formulas; activations are allowances)."""
    itemsize = parse_dtype(dtype).itemsize
    llm = config.llm
    tokens = context_tokens or llm.max_position_embeddings
    kv_heads = llm.num_key_value_heads or llm.num_attention_heads
    head_dim = llm.hidden_size // llm.num_attention_heads
    mmfs_layers = len(llm.mmfs_layer_indices())
    grid = config.visual_tokenizer.encoder.grid_size
    pyramid = [grid * 4 // 2**k for k in range(4)]  # ViT-Adapter maps: strides 4, 8, 16, 32 of the 4g input
    llm_positions = sum(pyramid[level] ** 2 for level in config.llm_mmfs_levels)
    unet_positions = sum(pyramid[level] ** 2 for level in config.unet_mmfs_levels)
    unet_blocks = len(unet_skip_channels(config.image_decoder.unet)) + 1  # every skip tensor + the mid block
    return {
        "kv_cache": 2 * llm.num_hidden_layers * tokens * kv_heads * head_dim * itemsize,
        "hidden_states": tokens * llm.hidden_size * itemsize,
        "llm_mmfs_values": images * mmfs_layers * llm_positions * llm.mmfs.value_dim * itemsize,
        "image_features": images * sum(p * p for p in pyramid) * config.image_embed_dim * itemsize,
        "unet_mmfs_values_cfg": 2 * unet_blocks * unet_positions * config.image_decoder.mmfs.value_dim * itemsize,
        "llm_prefill_activations": tokens * (4 * llm.hidden_size + 2 * llm.intermediate_size) * itemsize,
        "unet_activation_allowance": UNET_ACTIVATION_ALLOWANCE,
        "vae_decode_allowance": 6 * 128 * config.image_decoder.image_size**2 * 4,  # float32 up-blocks at full size
    }


def estimate_peaks(
    config: MMInterleavedConfig, dtype: str | torch.dtype = "bfloat16", budget_bytes: int = 24 * GIB, images: int = 8
) -> dict:
    """Estimated peak device memory of each offload mode (weights from the meta build + :func:`runtime_bytes`),
    and the resident LLM layers that ``"sequential"`` keeps within ``budget_bytes``."""
    weights, layer_bytes = _meta_sizes(config, parse_dtype(dtype))
    runtime = runtime_bytes(config, dtype, images=images)
    group_bytes = {g: sum(weights[c] for c in members) for g, members in GROUPS.items()}
    caches = runtime["kv_cache"] + runtime["hidden_states"] + runtime["llm_mmfs_values"] + runtime["image_features"]
    text_work = caches + runtime["llm_prefill_activations"]
    image_work = caches + runtime["unet_mmfs_values_cfg"] + runtime["unet_activation_allowance"]
    image_work += runtime["vae_decode_allowance"]
    language_fixed = group_bytes["language"] - sum(layer_bytes)
    reserve = max(group_bytes["vision"], group_bytes["diffusion"]) + max(text_work, image_work)
    resident, room = 0, budget_bytes - language_fixed - reserve - max(layer_bytes)
    for size in layer_bytes:
        if room - size < 0:
            break
        room -= size
        resident += 1
    resident_bytes = language_fixed + sum(layer_bytes[:resident]) + max(layer_bytes)
    return {
        "component_bytes": weights,
        "group_bytes": group_bytes,
        "runtime_bytes": runtime,
        "peak_bytes": {
            "none": sum(weights.values()) + max(text_work, image_work),
            "model": max(
                group_bytes["language"] + text_work,
                group_bytes["language"] + group_bytes["diffusion"] + image_work,
            ),
            "sequential": max(resident_bytes + text_work, resident_bytes + group_bytes["diffusion"] + image_work),
        },
        "sequential_resident_layers": resident,
        "llm_layers": len(layer_bytes),
        "streamed_bytes_per_token": sum(layer_bytes[resident:]),
        "budget_bytes": budget_bytes,
    }
