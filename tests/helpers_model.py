"""Shared helpers of the MMInterleaved tests: the tiny official model and the forward-case inputs."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.models.diffusion import DiffusionDraws
from comfy_mm_interleaved.models.mm_interleaved import MMInterleaved
from comfy_mm_interleaved.models.visual_tokenizer import VisualTokenizerOutput
from conftest import GoldenCase, golden_dir

PART_PREFIXES = {"with_visual_tokenizer": "visual_tokenizer.", "with_image_decoder": "image_decoder."}


def tiny_config() -> MMInterleavedConfig:
    return MMInterleavedConfig.from_official_tiny(golden_dir() / "tiny_config.json")


def tiny_model(config: MMInterleavedConfig | None = None, **parts: bool) -> MMInterleaved:
    """The tiny official model (``parts``: ``with_visual_tokenizer`` / ``with_image_decoder``), weights loaded with
    ``strict=True``; the official keys left out are exactly those of the parts that were left out."""
    model = MMInterleaved(config or tiny_config(), **parts).eval()
    official = load_file(str(golden_dir() / "tiny_official_state_dict.safetensors"))
    own = set(model.state_dict())
    absent = tuple(prefix for name, prefix in PART_PREFIXES.items() if not parts.get(name, True))
    stray = sorted(k for k in official if k not in own and not k.startswith(absent))
    assert not stray, f"official keys missing from the model: {stray[:5]}"
    model.load_state_dict({k: v for k, v in official.items() if k in own}, strict=True)
    return model


def fixture_visual(case: GoldenCase) -> VisualTokenizerOutput:
    """The fixture's visual-tokenizer output (inputs of the LLM-side tests)."""
    levels = len(case.keys("vit.multiscale_features."))
    return VisualTokenizerOutput(
        vis_embed=case["vt.vis_embed"],
        multiscale_features=[case[f"vit.multiscale_features.{k}"] for k in range(levels)],
        last_hidden_state=case["vit.last_hidden_state"],
    )


def forward_kwargs(case: GoldenCase) -> dict:
    """The text-side arguments of the official forward call."""
    return {
        "text_ids": case["in.text_ids"],
        "num_image_per_seq": case["in.num_image_per_seq"],
        "attention_mask": case["in.attention_mask"],
        "nearest_bos_idxs": case["in.nearest_bos_idxs"],
        "meta": case.meta["call"]["kwargs"]["meta"],
    }


def fixture_images(case: GoldenCase, name: str) -> torch.Tensor:
    return case[f"in.{name}_uint8"].float() / 255


def fixture_draws(case: GoldenCase) -> DiffusionDraws:
    return DiffusionDraws(
        case["rng.cfg_uncond_rand"], case["rng.vae_posterior_eps"], case["rng.diffusion_noise"], case["rng.timesteps"]
    )
