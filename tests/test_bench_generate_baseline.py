"""The benchmark baseline's official-way MMFS (``bench/generate.py``) computes the same numbers as our MMFS."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.models.image_decoder import ImageDecoder
from comfy_mm_interleaved.models.mmfs import MMFS
from conftest import REPO_ROOT, assert_close

ATOL = 1e-5


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_generate", REPO_ROOT / "bench" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (the official init leaves zero offset weights, zero convs and a zero null token)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def random_mmfs(seed: int) -> MMFS:
    mmfs = MMFS(
        d_query=24,
        d_value=12,
        d_out=20,
        value_dim=16,
        n_levels=3,
        n_heads=4,
        n_points=3,
        spatial_shapes=[8, 4, 2],
        base_spatial_shape=4,
        max_num_images=6,
        offset_init_magnitude=2.0,
    ).eval()
    randomise(mmfs, seed)
    return mmfs


@pytest.mark.parametrize("mask", ["per_query", "per_row", "last_row"])
@pytest.mark.parametrize("backend", ["gather", "reference"])
def test_official_way_mmfs_equals_ours(mask: str, backend: str, monkeypatch) -> None:
    monkeypatch.setenv("MMI_MSDA_BACKEND", backend)
    ours = random_mmfs(seed=0)
    official = bench.OfficialMMFS.like(ours)
    assert type(official) is bench.OfficialMMFS
    inputs = bench.random_mmfs_inputs(ours, torch.Generator().manual_seed(1), n_img=4, lq=7)
    visible = inputs["attention_mask"]  # [N, Lq, n_img], row 0 / query 0 sees nothing
    if mask == "per_row":
        inputs["attention_mask"] = visible[:, 1]  # [N, n_img]
    elif mask == "last_row":  # KV-cached decoding: one new query reads the prompt's last row
        inputs["query"] = inputs["query"][:, -1:]
        inputs["reference_points"] = inputs["reference_points"][:, -1:]
    with torch.no_grad():
        expected = ours(**inputs)
        actual = official(**inputs)
        from_values = official(**{**inputs, "input_flatten": None}, values=ours.project_values(inputs["input_flatten"]))
    assert expected.abs().max() > 0.1  # a real case, not the null output
    assert_close(actual, expected, ATOL, f"official-way MMFS ({mask}, {backend})")
    assert_close(from_values, expected, ATOL, "official-way MMFS from projected values")


def test_official_way_mmfs_null_output_when_nothing_is_visible() -> None:
    """A query that sees no image gets output_proj(ignore_token) (the release's all-masked rows)."""
    ours = random_mmfs(seed=2)
    official = bench.OfficialMMFS.like(ours)
    inputs = bench.random_mmfs_inputs(ours, torch.Generator().manual_seed(3))
    inputs["attention_mask"] = torch.zeros_like(inputs["attention_mask"])
    with torch.no_grad():
        actual = official(**inputs)
        expected = ours.output_proj(ours.ignore_token.reshape(1, 1, -1)).expand_as(actual)
    assert_close(actual, expected, ATOL, "all-masked official-way MMFS")


def test_official_way_unet_mmfs_equals_ours(golden: Path) -> None:
    """The UNet with the official per-call MMFSNet (features re-normalised and re-projected at every call, CFG
    batch of 2, one entry without a source image) gives our cached MMFSNet's prediction."""
    config = MMInterleavedConfig.from_official_tiny(golden / "tiny_config.json")
    ours = ImageDecoder(config).eval()
    randomise(ours.mmfs_module, seed=4)
    official = copy.deepcopy(ours)
    official.decoder.mmfs_module = bench.OfficialMMFSNet.like(ours.mmfs_module, ours.config)
    for block in official.mmfs_module.blocks:
        block.mmfs = bench.OfficialMMFS.like(block.mmfs)

    generator = torch.Generator().manual_seed(5)
    dim = ours.mmfs_module.feature_dim
    features = [torch.randn(2, dim, s, s, generator=generator) for s in ours.config.mmfs.spatial_shapes]
    mask = torch.tensor([[1], [0]])
    latents = torch.randn(4, *ours.decoder.latent_shape(ours.config.image_size, ours.config.image_size))
    hidden = torch.randn(4, ours.config.prompt_length, ours.neg_prompt_embeds.shape[-1], generator=generator)
    with torch.no_grad():
        expected = ours.decoder.denoise(latents, 500, hidden, ours.prepare_mmfs(features, mask).repeat_batch(2))
        context = official.prepare_mmfs(features, mask).repeat_batch(2)
        actual = official.decoder.denoise(latents, 500, hidden, context)
        plain = ours.decoder.denoise(
            latents, 500, hidden, ours.prepare_mmfs(None, torch.zeros_like(mask)).repeat_batch(2)
        )
    assert isinstance(context, bench.SourcePyramid) and context.values is None
    assert (expected - plain).abs().max() > 1e-3  # the MMFS residuals matter in this case
    assert_close(actual, expected, ATOL, "UNet prediction with the official-way MMFSNet")
