"""Build a fresh ``MMInterleaved`` whose pretrained parts come from separately installed local folders.

This is the starting point for training from scratch, as the official code does it (OFFICIAL_MODEL.md 4.3):

* a Vicuna / LLaMA transformers folder (``LlamaForCausalLM``): ``model.*`` -> ``mm_decoder.*`` (the MMFS blocks
  keep their official init); ``embed_tokens`` rows ``0..V-1`` are copied and the added rows (BOI, image token) are
  drawn from N(0, initializer_range), as ``resize_token_embeddings`` did; ``lm_head`` rows ``0..V-1`` ->
  ``text_decoder.head`` (the added rows, the biases and ``head_new`` keep the official init of ``TextDecoder``);
* a CLIP transformers folder (``CLIPModel`` or ``CLIPVisionModel``): ``vision_model.*`` ->
  ``visual_tokenizer.encoder.vision_model.*``, without ``post_layernorm`` (the ViT-Adapter keeps its init);
* a Stable Diffusion 2.1 diffusers folder: ``unet/`` and ``vae/`` weights, and ``neg_prompt_embeds`` =
  ``text_encoder(tokenizer(""))`` when ``text_encoder/`` and ``tokenizer/`` are present. Without them the
  documented fallback keeps the model's N(0, 0.02) draw (the official value before it is overwritten) and warns.

Nothing is ever downloaded: every argument is a local folder, and missing folders or files are clear errors.
Each folder's ``config.json`` must agree with the ``MMInterleavedConfig`` (mismatching fields are listed).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .checkpoint import CheckpointError, format_list
from .config import MMInterleavedConfig
from .convert import load_pickled_state_dict

LLM_PREFIX = "mm_decoder."
VISION_PREFIX = "visual_tokenizer.encoder.vision_model."
UNET_PREFIX = "image_decoder.decoder.unet."
VAE_PREFIX = "image_decoder.decoder.vae."
NEG_PROMPT_KEY = "image_decoder.neg_prompt_embeds"
HEAD_KEY = "text_decoder.head.weight"

# Older diffusers VAEs name their mid-block attention query/key/value/proj_attn (converted on load by diffusers).
_DEPRECATED_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# ----------------------------------------------------------------------------------------------------------------
# Reading local transformers / diffusers folders


def _require_folder(folder: str | Path, what: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{what} folder {folder} does not exist; pass the local folder (nothing is downloaded)")
    return folder


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} is missing; is this the right folder?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{what}: {path} is not valid JSON ({err})") from None


def _weight_files(folder: Path, stems: tuple[str, str], what: str) -> list[Path]:
    """The weight files of a transformers/diffusers folder: sharded or single, safetensors preferred."""
    safetensors_stem, pickle_stem = stems
    for name, suffix in ((safetensors_stem, ".safetensors"), (pickle_stem, ".bin")):
        index = folder / f"{name}{suffix}.index.json"
        if index.is_file():
            files = sorted(set(_read_json(index, what).get("weight_map", {}).values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise CheckpointError(f"{what}: {index} lists missing file(s) {format_list(missing)}")
            return [folder / f for f in files]
        if (folder / f"{name}{suffix}").is_file():
            return [folder / f"{name}{suffix}"]
    raise CheckpointError(
        f"{what}: no weights in {folder} (expected {safetensors_stem}.safetensors, {pickle_stem}.bin or a sharded "
        "index of either)"
    )


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) over the files, one file open at a time."""
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            yield from load_pickled_state_dict(path).items()


# ----------------------------------------------------------------------------------------------------------------
# Config agreement


def _check_fields(what: str, found: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Every field of ``expected`` that ``found`` also has must be equal (lists and tuples compare alike)."""

    def norm(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    wrong = [
        f"{name}={norm(found[name])!r} (config: {norm(value)!r})"
        for name, value in expected.items()
        if name in found and norm(found[name]) != norm(value)
    ]
    if wrong:
        raise CheckpointError(
            f"{what} does not match the MMInterleavedConfig: {'; '.join(wrong)}; use the matching folder or config"
        )


def _llm_fields(config: MMInterleavedConfig) -> dict[str, Any]:
    llm = config.llm
    return {
        "vocab_size": config.orig_vocab_size,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_hidden_layers,
        "num_attention_heads": llm.num_attention_heads,
        "rms_norm_eps": llm.rms_norm_eps,
    }


def _clip_fields(config: MMInterleavedConfig) -> dict[str, Any]:
    vit = config.visual_tokenizer.encoder
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")
    return {name: getattr(vit, name) for name in names} | {"image_size": vit.image_size}


# ----------------------------------------------------------------------------------------------------------------
# Copying tensors into the model


class _Loader:
    """Copies source tensors into the model's state dict (shared storage) and records what was covered."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.targets = model.state_dict()
        self.covered: set[str] = set()

    @torch.no_grad()
    def copy(self, key: str, tensor: torch.Tensor, what: str, rows: int | None = None) -> None:
        """``targets[key] = tensor`` (or its first ``rows`` rows), checking shapes."""
        target = self.targets[key] if rows is None else self.targets[key][:rows]
        source = tensor if rows is None else tensor[:rows]
        if tuple(source.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{what}: tensor for {key} has shape {list(source.shape)}, the model expects {list(target.shape)}; "
                "the folder does not fit the MMInterleavedConfig"
            )
        target.copy_(source)
        self.covered.add(key)

    def require(self, prefix: str, what: str, exempt: tuple[str, ...] = ()) -> None:
        """Every model tensor under ``prefix`` (except names containing an ``exempt`` part) must have been copied."""
        wanted = (k for k in self.targets if k.startswith(prefix) and not any(part in k for part in exempt))
        missing = sorted(k for k in wanted if k not in self.covered)
        if missing:
            raise CheckpointError(f"{what} lacks tensors the model needs: {format_list(missing)}")


def _reject_unknown(unknown: list[str], what: str) -> None:
    if unknown:
        raise CheckpointError(f"{what} has tensors with no place in the model: {format_list(sorted(unknown))}")


@dataclass
class _Source:
    """A checked local folder: its config agrees with ours and its weight files exist."""

    what: str
    config: dict[str, Any]
    files: list[Path]


_TRANSFORMERS_STEMS = ("model", "pytorch_model")
_DIFFUSERS_STEMS = ("diffusion_pytorch_model", "diffusion_pytorch_model")


def _open_source(
    folder: str | Path, kind: str, stems: tuple[str, str], expected: Mapping[str, Any], nested: str = ""
) -> _Source:
    """``nested``: the sub-config to compare when present (``vision_config`` of a full ``CLIPModel``)."""
    folder = _require_folder(folder, kind)
    what = f"{kind} folder {folder}"
    config = _read_json(folder / "config.json", what)
    _check_fields(what, config.get(nested, config) if nested else config, expected)
    return _Source(what, config, _weight_files(folder, stems, what))


def _load_llm(loader: _Loader, source: _Source, config: MMInterleavedConfig) -> None:
    vocab = config.orig_vocab_size
    unknown = []
    for key, tensor in _iter_tensors(source.files):
        if key.endswith("rotary_emb.inv_freq"):  # recomputed, not stored by the official model
            continue
        if key == "lm_head.weight":
            loader.copy(HEAD_KEY, tensor, source.what, rows=vocab)
        elif key == "model.embed_tokens.weight":
            loader.copy(LLM_PREFIX + "embed_tokens.weight", tensor, source.what, rows=vocab)
        elif key.startswith("model.") and LLM_PREFIX + key[len("model.") :] in loader.targets:
            loader.copy(LLM_PREFIX + key[len("model.") :], tensor, source.what)
        else:
            unknown.append(key)
    _reject_unknown(unknown, source.what)
    loader.require(LLM_PREFIX, source.what, exempt=(".llama_cross_attn.",))
    if HEAD_KEY not in loader.covered:
        raise CheckpointError(f"{source.what} has no lm_head.weight (a LlamaForCausalLM folder is needed)")
    embed = loader.targets[LLM_PREFIX + "embed_tokens.weight"]
    with torch.no_grad():  # the added token rows, drawn as transformers 4.31's resize_token_embeddings did
        embed[vocab:].normal_(0.0, float(source.config.get("initializer_range", 0.02)))


def _load_clip(loader: _Loader, source: _Source) -> None:
    unknown = []
    for key, tensor in _iter_tensors(source.files):
        if not key.startswith("vision_model.") or key.startswith("vision_model.post_layernorm."):
            continue  # text tower, projections and the final LayerNorm are not part of MM-Interleaved
        target = VISION_PREFIX + key[len("vision_model.") :]
        if target in loader.targets:
            loader.copy(target, tensor, source.what)
        else:
            unknown.append(key)
    _reject_unknown(unknown, source.what)
    # the ViT-Adapter is new; position_ids is a fixed arange that newer transformers no longer save
    loader.require(VISION_PREFIX, source.what, exempt=(".adapter_", "embeddings.position_ids"))


def _diffusers_key(key: str) -> str:
    parts = key.split(".")
    if "attentions" in parts and len(parts) >= 2 and parts[-2] in _DEPRECATED_VAE_ATTENTION:
        parts[-2] = _DEPRECATED_VAE_ATTENTION[parts[-2]]
    return ".".join(parts)


def _load_diffusers_part(loader: _Loader, source: _Source, prefix: str) -> None:
    unknown = []
    for key, tensor in _iter_tensors(source.files):
        target = prefix + _diffusers_key(key)
        if target in loader.targets:
            loader.copy(target, tensor, source.what)
        else:
            unknown.append(key)
    _reject_unknown(unknown, source.what)
    loader.require(prefix, source.what)


@torch.no_grad()
def negative_prompt_embeds(sd_folder: str | Path) -> torch.Tensor | None:
    """SD's ``text_encoder(tokenizer(""))`` last hidden state [1, L, D], or ``None`` without those subfolders."""
    sd_folder = Path(sd_folder)
    encoder_dir, tokenizer_dir = sd_folder / "text_encoder", sd_folder / "tokenizer"
    if not (encoder_dir.is_dir() and tokenizer_dir.is_dir()):
        return None
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(encoder_dir, local_files_only=True).float().eval()
    ids = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return encoder(ids, attention_mask=None).last_hidden_state


def _load_negative_prompt(loader: _Loader, sd_folder: Path) -> None:
    embeds = negative_prompt_embeds(sd_folder)
    if embeds is None:
        warnings.warn(
            f"{sd_folder} has no text_encoder/ and tokenizer/: neg_prompt_embeds keeps its N(0, 0.02) init instead "
            "of SD's embedding of the empty prompt",
            stacklevel=3,
        )
        return
    loader.copy(NEG_PROMPT_KEY, embeds, f"SD text encoder in {sd_folder}")


# ----------------------------------------------------------------------------------------------------------------


def build_from_components(
    config: MMInterleavedConfig,
    llm_folder: str | Path,
    clip_folder: str | Path,
    sd_folder: str | Path,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """A float32 ``MMInterleaved(config)`` (official init) with the LLM, CLIP and SD weights of the local folders.

    Cast afterwards (``model.to(torch.bfloat16)``) if needed; save it with ``checkpoint.save_pretrained``.
    """
    from .models.mm_interleaved import MMInterleaved

    decoder = config.image_decoder
    llm = _open_source(llm_folder, "LLaMA", _TRANSFORMERS_STEMS, _llm_fields(config))
    clip = _open_source(clip_folder, "CLIP", _TRANSFORMERS_STEMS, _clip_fields(config), nested="vision_config")
    sd_folder = _require_folder(sd_folder, "Stable Diffusion")
    unet = _open_source(sd_folder / "unet", "SD UNet", _DIFFUSERS_STEMS, decoder.unet)
    vae = _open_source(sd_folder / "vae", "SD VAE", _DIFFUSERS_STEMS, decoder.vae)
    scheduler_file = sd_folder / "scheduler" / "scheduler_config.json"
    _check_fields(f"scheduler of {sd_folder}", _read_json(scheduler_file, "Stable Diffusion"), decoder.scheduler)

    with torch.device(device):
        model = MMInterleaved(config)
    loader = _Loader(model)
    _load_llm(loader, llm, config)
    _load_clip(loader, clip)
    _load_diffusers_part(loader, unet, UNET_PREFIX)
    _load_diffusers_part(loader, vae, VAE_PREFIX)
    _load_negative_prompt(loader, sd_folder)
    return model
