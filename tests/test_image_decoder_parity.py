"""Image decoder (Q-Former prompt embeds, UNet + MMFSNet, VAE, DDPM) against the official code's golden fixtures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.models.diffusion import DiffusionDraws, DiffusionStep, build_scheduler, initial_latents
from comfy_mm_interleaved.models.image_decoder import ImageDecoder
from comfy_mm_interleaved.models.posembed import sincos_2d
from comfy_mm_interleaved.models.visual_tokenizer import VisualTokenizer
from conftest import REPO_ROOT, assert_close, golden_dir, load_case

ATOL = 1e-4
PREFIX = "image_decoder."
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="module")
def tiny_config(golden: Path) -> MMInterleavedConfig:
    return MMInterleavedConfig.from_official_tiny(golden / "tiny_config.json")


@pytest.fixture(scope="module")
def official_subset(golden: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(golden / "tiny_official_state_dict.safetensors"))
    return {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def decoder(tiny_config: MMInterleavedConfig, official_subset: dict[str, torch.Tensor]) -> ImageDecoder:
    model = ImageDecoder(tiny_config).eval()
    model.load_state_dict(official_subset, strict=True)
    return model


@pytest.fixture(scope="module")
def forward_case():
    return load_case("forward")


@pytest.fixture(scope="module")
def generate_case():
    return load_case("generate")


def mmfs_source_features(case) -> list[torch.Tensor]:
    """Each image's MMFS source: all pyramid levels of image ``imgdec.mmfs_source_image[i]`` (zeros if none)."""
    source = case["imgdec.mmfs_source_image"]
    levels = []
    for name in case.keys("vit.multiscale_features."):
        maps = case[name]
        picked = maps[source.clamp(min=0)]
        levels.append(torch.where((source >= 0)[:, None, None, None], picked, torch.zeros_like(picked)))
    return levels


@pytest.fixture(scope="module")
def training_run(decoder: ImageDecoder, forward_case):
    case = forward_case
    draws = DiffusionDraws(
        cfg_uncond_rand=case["rng.cfg_uncond_rand"],
        vae_posterior_eps=case["rng.vae_posterior_eps"],
        diffusion_noise=case["rng.diffusion_noise"],
        timesteps=case["rng.timesteps"],
    )
    context_mask = case["imgdec.context_attention_mask"]
    images = case["in.image_tensors_dec_uint8"].float() / 255
    images_before = images.clone()
    with torch.no_grad():
        loss, out = decoder.training_loss(
            images,
            case["imgdec.context_features"],
            context_mask,
            mmfs_source_features(case),
            case["imgdec.mmfs_mask"],
            loss_mask=(context_mask.sum(1) > 2).float(),  # image-first images (<s><BOI> only) carry no loss
            draws=draws,
        )
    assert torch.equal(images, images_before), "training_loss must not modify the caller's images"
    return loss, out


# --------------------------------------------------------------------------------------------------------------
def test_image_decoder_state_dict_parity(tiny_config: MMInterleavedConfig, official_subset) -> None:
    model = ImageDecoder(tiny_config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in official_subset.items()}
    assert ours == theirs
    # the fixed MMFSNet position tables are rebuilt exactly (grid and channel count from each stored table)
    for key, table in official_subset.items():
        if key.endswith(".pos_embed") and "mmfs_module" in key:
            grid = int(round(table.shape[0] ** 0.5))
            assert_close(sincos_2d(table.shape[1], grid), table, 1e-6, key)
            assert_close(model.state_dict()[key], table, 1e-6, key)


def test_image_decoder_prompt_embeds_parity(decoder: ImageDecoder, forward_case, generate_case) -> None:
    with torch.no_grad():
        ours = decoder.prompt_embeds(
            forward_case["imgdec.context_features"], forward_case["imgdec.context_attention_mask"]
        )
        assert_close(ours, forward_case["imgdec.prompt_embeds"], ATOL, "forward imgdec.prompt_embeds")
        ours = decoder.prompt_embeds(
            generate_case["image.context_features"], generate_case["image.context_attention_mask"]
        )
        assert_close(ours, generate_case["image.prompt_embeds"], ATOL, "generate image.prompt_embeds")
    negative = generate_case["image.negative_prompt_embeds"]
    assert_close(decoder.neg_prompt_embeds.expand_as(negative), negative, 0.0, "negative prompt embeds")


def test_image_decoder_training_conditioning_parity(training_run, forward_case) -> None:
    _, out = training_run
    assert torch.equal(out["cfg_uncond_mask"], forward_case["rng.cfg_uncond_mask"])
    assert_close(out["prompt_embeds"], forward_case["imgdec.prompt_embeds"], ATOL, "prompt_embeds")
    assert_close(
        out["encoder_hidden_states"], forward_case["imgdec.unet_encoder_hidden_states"], ATOL, "unet hidden states"
    )


def test_image_decoder_training_latents_parity(training_run, forward_case) -> None:
    _, out = training_run
    for ours, theirs in [
        ("vae_posterior_mean", "sd.vae_posterior_mean"),
        ("vae_posterior_std", "sd.vae_posterior_std"),
        ("latents", "sd.latents"),
        ("noisy_latents", "sd.noisy_latents"),
    ]:
        assert_close(out[ours], forward_case[theirs], ATOL, theirs)


def test_image_decoder_unet_mmfs_parity(training_run, forward_case) -> None:
    _, out = training_run
    names = [k.removeprefix("unet_mmfs.") for k in forward_case.keys("unet_mmfs.")]
    assert names and len(names) == len([k for k in out if k.startswith("mmfs.")])
    for name in names:
        assert_close(out[f"mmfs.{name}"], forward_case[f"unet_mmfs.{name}"], ATOL, f"unet_mmfs.{name}")


def test_image_decoder_mmfs_blocks_parity(decoder: ImageDecoder, forward_case) -> None:
    """Each MMFS block alone, fed the fixture's own skip tensors (isolates MMFSNet from the UNet)."""
    case = forward_case
    mmfs = decoder.mmfs_module
    with torch.no_grad():
        context = mmfs.prepare(mmfs_source_features(case), case["imgdec.mmfs_mask"])
        skips = [case[f"unet_mmfs.down{k}.input"] for k in range(len(mmfs.mmfs_down_blocks))]
        trace: dict[str, torch.Tensor] = {}
        mid, new_skips = mmfs(case["unet_mmfs.mid.input"], skips, context, trace)
    for name, value in trace.items():
        if name.endswith(".residual"):
            assert_close(value, case[f"unet_mmfs.{name}"], ATOL, name)
    assert_close(mid, case["unet_mmfs.mid.input"] + case["unet_mmfs.mid.residual"], ATOL, "mid output")
    assert_close(new_skips[0], skips[0] + case["unet_mmfs.down0.residual"], ATOL, "down0 output")


def test_image_decoder_training_loss_parity(training_run, forward_case) -> None:
    loss, out = training_run
    assert_close(out["model_pred"], forward_case["sd.model_pred"], ATOL, "sd.model_pred")
    assert_close(out["loss_elementwise"], forward_case["sd.loss_elementwise"], ATOL, "sd.loss_elementwise")
    assert_close(loss, torch.tensor(forward_case.meta["scalars"]["loss_img"]), ATOL, "loss_img")


# --------------------------------------------------------------------------------------------------------------
def generate_steps(case) -> list[int]:
    return case.meta["image_generation"]["timesteps"]


def generate_guidance(case) -> float:
    return float(re.search(r"guidance_scale=([0-9.]+)", case.meta["image_generation"]["call"]).group(1))


def test_image_decoder_ddpm_schedule_parity(decoder: ImageDecoder, generate_case) -> None:
    steps = generate_steps(generate_case)
    scheduler = build_scheduler(decoder.config.scheduler, "ddpm")
    scheduler.set_timesteps(len(steps))
    assert scheduler.timesteps.tolist() == steps


def test_image_decoder_ddpm_step_parity(decoder: ImageDecoder, generate_case) -> None:
    """CFG combination and one injected-noise DDPM step per recorded step, chained from the initial latents."""
    case = generate_case
    steps = generate_steps(case)
    guidance = generate_guidance(case)
    scheduler = build_scheduler(decoder.config.scheduler, "ddpm")
    scheduler.set_timesteps(len(steps))
    assert_close(case["image.step0.latents_in"], case["image.init_latents"], 0.0, "step0 input = init latents")
    for i, t in enumerate(scheduler.timesteps):
        uncond, cond = case[f"image.step{i}.noise_pred_uncond"], case[f"image.step{i}.noise_pred_text"]
        guided = uncond + guidance * (cond - uncond)
        assert_close(guided, case[f"image.step{i}.noise_pred_guided"], ATOL, f"step{i} guided")
        out = scheduler.step(
            guided, t, case[f"image.step{i}.latents_in"], variance_noise=case[f"image.step{i}.variance_noise"]
        ).prev_sample
        assert_close(out, case[f"image.step{i}.latents_out"], ATOL, f"step{i} latents_out")


def test_image_decoder_generator_draws_parity(decoder: ImageDecoder, generate_case, golden: Path) -> None:
    """The sampler's seeded draws are the official pipeline's: init latents, then one variance noise per step."""
    case = generate_case
    seed = json.loads((golden / "tiny_config.json").read_text(encoding="utf-8"))["model"]["image_decoder_config"][
        "sd_base_seed"
    ]
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(case["image.init_latents"].shape)
    assert_close(initial_latents(shape, generator, torch.device("cpu"), torch.float32), case["image.init_latents"], 0.0)
    for i in range(len(generate_steps(case))):
        noise = torch.randn(shape, generator=generator)
        assert_close(noise, case[f"image.step{i}.variance_noise"], 0.0, f"step{i} variance noise")


def test_image_decoder_sample_parity(
    decoder: ImageDecoder, tiny_config: MMInterleavedConfig, golden: Path, generate_case
) -> None:
    """The whole sampler with the recorded draws injected: per-step CFG predictions, latents and the final image.
    The MMFS source (the prompt's last image: the one just before the target) is encoded by the visual tokenizer,
    which has its own parity tests; ``image.mmfs_mask`` says whether the UNet sees it."""
    case = generate_case
    state = load_file(str(golden / "tiny_official_state_dict.safetensors"))
    tokenizer = VisualTokenizer(tiny_config).eval()
    vt_prefix = "visual_tokenizer."
    tokenizer.load_state_dict({k.removeprefix(vt_prefix): v for k, v in state.items() if k.startswith(vt_prefix)})
    steps = len(generate_steps(case))
    with torch.no_grad():
        source = case["image.in.image_tensors_uint8"][-1:]  # [1, 3, H, W]
        pyramid = tokenizer(source.float() / 255).multiscale_features
        prompt = decoder.prompt_embeds(case["image.context_features"], case["image.context_attention_mask"])
    records: list[DiffusionStep] = []
    image = decoder.sample(
        prompt,
        [pyramid[level] for level in tiny_config.unet_mmfs_levels],
        case["image.mmfs_mask"],
        num_inference_steps=steps,
        guidance_scale=generate_guidance(case),
        init_latents=case["image.init_latents"],
        variance_noises=[case[f"image.step{i}.variance_noise"] for i in range(steps)],
        callback=records.append,
    )
    assert [r.timestep for r in records] == generate_steps(case)
    for i, record in enumerate(records):
        for field, name in [
            ("latents_in", "latents_in"),
            ("noise_pred_uncond", "noise_pred_uncond"),
            ("noise_pred_cond", "noise_pred_text"),
            ("noise_pred", "noise_pred_guided"),
            ("latents_out", "latents_out"),
        ]:
            assert_close(getattr(record, field), case[f"image.step{i}.{name}"], ATOL, f"step{i}.{name}")
    assert_close(records[-1].latents_out, case["image.final_latents"], ATOL, "final latents")
    assert_close(image, case["image.out.image"], ATOL, "image.out.image")


def test_image_decoder_vae_decode_parity(decoder: ImageDecoder, generate_case) -> None:
    with torch.no_grad():
        image = decoder.decoder.decode(generate_case["image.final_latents"])
    assert_close(image, generate_case["image.out.image"], ATOL, "image.out.image")


# --------------------------------------------------------------------------------------------------------------
def test_image_decoder_official_13b_meta_keys_parity() -> None:
    candidates = [path / "official_state_dict_keys.json" for path in (golden_dir().parent / "reference", REFERENCE_DIR)]
    found = [path for path in candidates if path.exists()]
    assert found, f"official_state_dict_keys.json not found in {[str(p) for p in candidates]}"
    reference = json.loads(found[0].read_text(encoding="utf-8"))
    expected = {
        k.removeprefix(PREFIX): (tuple(shape), dtype) for k, (shape, dtype) in reference.items() if k.startswith(PREFIX)
    }
    with torch.device("meta"):
        model = ImageDecoder(MMInterleavedConfig.official_13b())
    ours = {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}
    assert ours == expected
