"""Frozen parts and optimiser parameter groups of the official recipe (OFFICIAL_MODEL.md §3.3).

Group rules are name substrings; the first matching rule wins and sets the learning rate and, unless it says
``weight_decay: null``, the weight decay. Inside every group, biases and the parameters of ``nn.LayerNorm``
modules get no weight decay (the official trainer's ``ALL_LAYERNORM_LAYERS`` test: RMSNorm and GroupNorm weights
are decayed there, and so here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass
class ParamRule:
    match: str  # name substring
    lr: float
    weight_decay: float | None = None  # None: the base weight decay


OFFICIAL_RULES = [
    ParamRule("llama_cross_attn.gate", 1e-4, 0.0),
    ParamRule("sampling_offsets", 1e-5, 0.0),
    ParamRule("llama_cross_attn", 1e-4, None),
    ParamRule("image_decoder.decoder.unet", 1e-5, None),
]

# Parameter-name substrings frozen in the official model; a name containing an ``except`` substring stays trainable.
OFFICIAL_FROZEN = [
    ("visual_tokenizer.encoder.", ("adapter",)),  # CLIP ViT frozen, ViT-Adapter trained
    ("mm_decoder.", ("llama_cross_attn",)),  # Vicuna frozen (new embedding rows too), MMFS trained
    ("text_decoder.head.", ()),  # copied lm_head (text_decoder.head_new is trained)
    ("image_decoder.decoder.vae.", ()),
    ("pos_embed", ()),  # fixed sin-cos tables
    ("ignore_token", ()),
]


def is_officially_frozen(name: str) -> bool:
    return any(prefix in name and not any(e in name for e in exceptions) for prefix, exceptions in OFFICIAL_FROZEN)


def apply_freezing(
    model: nn.Module, mode: str = "official", extra: list[str] | None = None, unfreeze: list[str] | None = None
) -> None:
    """``official``: freeze as in §3.3 (idempotent with the model's own settings); ``none``: leave as built.
    ``extra``: more name substrings to freeze (e.g. freeze the UNet for a text-only fine-tune); then ``unfreeze``:
    name substrings made trainable (e.g. ``text_decoder.head.``, a frozen copy of a pretrained LLM's head in the
    official model, for a model trained from scratch)."""
    if mode not in ("official", "none"):
        raise ValueError(f"model.freeze must be 'official' or 'none', got {mode!r}")
    for name, param in model.named_parameters():
        if (mode == "official" and is_officially_frozen(name)) or any(s in name for s in extra or []):
            param.requires_grad_(False)
        if any(s in name for s in unfreeze or []):
            param.requires_grad_(True)


def no_decay_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, nn.LayerNorm) or "bias" in full:
                names.add(full)
    return names


def build_param_groups(
    model: nn.Module, lr: float, weight_decay: float, rules: list[ParamRule]
) -> list[dict[str, Any]]:
    """AdamW groups: (rule or default) x (decay, no decay); empty groups are dropped. Each group has a ``name``."""
    no_decay = no_decay_names(model)
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rule = next((r for r in rules if r.match in name), None)
        group_lr = rule.lr if rule else lr
        group_wd = rule.weight_decay if rule and rule.weight_decay is not None else weight_decay
        decays = name not in no_decay
        key = (rule.match if rule else "default", decays)
        group = groups.setdefault(
            key,
            {
                "name": f"{key[0]}{'' if decays else '/no_decay'}",
                "params": [],
                "param_names": [],
                "lr": group_lr,
                "weight_decay": group_wd if decays else 0.0,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameter (check model.freeze and the checkpoint)")
    return list(groups.values())
