"""Image decoder behaviour: UNet threading, MMFS context caching, sampling options, random draws, bad inputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.models.diffusion import (
    SCHEDULERS,
    DiffusionDraws,
    DiffusionStep,
    NoiseInjectableDDPMScheduler,
    build_scheduler,
)
from comfy_mm_interleaved.models.image_decoder import ImageDecoder
from comfy_mm_interleaved.models.unet_mmfs import unet_forward_with_mmfs, unet_skip_channels
from conftest import assert_close

PREFIX = "image_decoder."


@pytest.fixture(scope="module")
def config(golden: Path) -> MMInterleavedConfig:
    return MMInterleavedConfig.from_official_tiny(golden / "tiny_config.json")


@pytest.fixture(scope="module")
def weights(golden: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(golden / "tiny_official_state_dict.safetensors"))
    return {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}


def build(config: MMInterleavedConfig, weights: dict[str, torch.Tensor]) -> ImageDecoder:
    model = ImageDecoder(config).eval()
    model.load_state_dict(weights, strict=True)
    return model


@pytest.fixture(scope="module")
def model(config, weights) -> ImageDecoder:
    return build(config, weights)


def features(model: ImageDecoder, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """A random 4-level pyramid with the official level sizes (spatial_shapes // nothing: the encoder's maps)."""
    g = torch.Generator().manual_seed(seed)
    dim = model.mmfs_module.feature_dim
    return [torch.randn(batch, dim, s, s, generator=g) for s in model.config.mmfs.spatial_shapes]


def context_inputs(model: ImageDecoder, batch: int, length: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(batch, length, model.config.resampler.encoder_hidden_size, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 3:] = 0
    return feats, mask


def images(model: ImageDecoder, batch: int) -> torch.Tensor:
    size = model.config.image_size
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(2))


def prompt(model: ImageDecoder, batch: int) -> torch.Tensor:
    shape = (batch, model.config.prompt_length, model.neg_prompt_embeds.shape[-1])
    return torch.randn(shape, generator=torch.Generator().manual_seed(3))


# --------------------------------------------------------------------------------------------------------------
def test_skip_channels_follow_unet_layout(config) -> None:
    unet = config.image_decoder.unet
    channels = unet["block_out_channels"]
    skips = unet_skip_channels(unet)
    layers = unet["layers_per_block"]
    assert len(skips) == 1 + len(channels) * layers + len(channels) - 1
    assert skips[0] == channels[0] and skips[-1] == channels[-1]
    assert unet_skip_channels({**unet, "layers_per_block": [1] * len(channels)}) == [channels[0]] + [
        c for i, c in enumerate(channels) for _ in range(1 if i == len(channels) - 1 else 2)
    ]


@pytest.mark.parametrize("latent_size", [None, 6])
def test_unet_forward_without_mmfs_is_diffusers_forward(model: ImageDecoder, latent_size: int | None) -> None:
    """The composed forward is the stock UNet forward when no MMFS is applied (also off the 2**k grid)."""
    unet = model.decoder.unet
    size = latent_size or model.decoder.latent_shape(model.config.image_size, model.config.image_size)[-1]
    g = torch.Generator().manual_seed(4)
    sample = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    hidden = prompt(model, 2)
    timesteps = torch.tensor([3, 870])
    with torch.no_grad():
        ours = unet_forward_with_mmfs(unet, sample, timesteps, hidden)
        stock = unet(sample, timesteps, hidden).sample
    assert_close(ours, stock, 1e-6, "composed UNet forward")


def test_mmfs_null_context_is_exact(model: ImageDecoder) -> None:
    """No visible source image: the prepared shortcut equals running MMFS on (ignored) features with mask 0."""
    mmfs = model.mmfs_module
    batch = 2
    g = torch.Generator().manual_seed(5)
    skips = [torch.randn(batch, c, 4, 4, generator=g) for c in unet_skip_channels(model.config.unet)]
    mid = torch.randn(batch, model.config.unet["block_out_channels"][-1], 2, 2, generator=g)
    zeros = torch.zeros(batch, 1, dtype=torch.long)
    with torch.no_grad():
        shortcut = mmfs.prepare(None, zeros)
        assert shortcut.values is None
        full = mmfs.prepare(features(model, batch), zeros)
        full_values = mmfs.prepare(features(model, batch), torch.tensor([[1], [0]])).values
        full = dataclasses.replace(full, values=full_values)  # force the sampling path with mask 0
        mid_a, skips_a = mmfs(mid, skips, shortcut)
        mid_b, skips_b = mmfs(mid, skips, full)
    assert_close(mid_a, mid_b, 1e-6, "mid")
    for k, (a, b) in enumerate(zip(skips_a, skips_b)):
        assert_close(a, b, 1e-6, f"skip {k}")


def test_mmfs_context_repeat_batch(model: ImageDecoder) -> None:
    """A context prepared once serves a stacked CFG batch: each half equals its own run."""
    mmfs = model.mmfs_module
    g = torch.Generator().manual_seed(6)
    skips = [torch.randn(4, c, 2, 2, generator=g) for c in unet_skip_channels(model.config.unet)]
    mid = torch.randn(4, model.config.unet["block_out_channels"][-1], 1, 1, generator=g)
    mask = torch.tensor([[1], [0]])
    with torch.no_grad():
        context = mmfs.prepare(features(model, 2), mask)
        mid_all, skips_all = mmfs(mid, skips, context.repeat_batch(2))
        for half in (slice(0, 2), slice(2, 4)):
            mid_half, skips_half = mmfs(mid[half], [s[half] for s in skips], context)
            assert_close(mid_all[half], mid_half, 1e-6, "mid half")
            assert_close(skips_all[3][half], skips_half[3], 1e-6, "skip half")


def test_injected_ddpm_step_equals_diffusers_step(config) -> None:
    scheduler = build_scheduler(config.image_decoder.scheduler, "ddpm")
    assert isinstance(scheduler, NoiseInjectableDDPMScheduler)
    scheduler.set_timesteps(5)
    g = torch.Generator().manual_seed(7)
    sample, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    for t in scheduler.timesteps:
        stock = scheduler.step(eps, t, sample, generator=torch.Generator().manual_seed(int(t))).prev_sample
        noise = torch.randn(eps.shape, generator=torch.Generator().manual_seed(int(t)))
        injected = scheduler.step(eps, t, sample, variance_noise=noise).prev_sample
        assert_close(injected, stock, 1e-6, f"t={int(t)}")


def test_sample_seeded_equals_injected_draws(model: ImageDecoder) -> None:
    batch, steps = 1, 2
    latent = (batch, *model.decoder.latent_shape(model.config.image_size, model.config.image_size))
    embeds, feats, mask = prompt(model, batch), features(model, batch), torch.ones(batch, 1)
    records: list[DiffusionStep] = []
    seeded = model.sample(
        embeds,
        feats,
        mask,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(11),
        callback=records.append,
    )
    g = torch.Generator().manual_seed(11)
    init = torch.randn(latent, generator=g)
    noises = [torch.randn(latent, generator=g) for _ in range(steps)]
    injected = model.sample(embeds, feats, mask, num_inference_steps=steps, init_latents=init, variance_noises=noises)
    assert seeded.shape == (batch, 3, model.config.image_size, model.config.image_size)
    assert_close(injected, seeded, 0.0, "seeded vs injected")
    assert [r.index for r in records] == list(range(steps))
    assert_close(records[0].latents_in, init, 0.0, "step 0 input")
    guided = records[0].noise_pred_uncond + 7.5 * (records[0].noise_pred_cond - records[0].noise_pred_uncond)
    assert_close(records[0].noise_pred, guided, 1e-6, "cfg combination")
    assert float(seeded.min()) >= 0.0 and float(seeded.max()) <= 1.0


def test_sample_guidance_one_runs_conditional_branch_only(model: ImageDecoder) -> None:
    embeds = prompt(model, 1)
    latent = (1, *model.decoder.latent_shape(model.config.image_size, model.config.image_size))
    init = torch.randn(latent, generator=torch.Generator().manual_seed(12))
    noises = [torch.zeros(latent)]
    records: list[DiffusionStep] = []
    kw = dict(num_inference_steps=1, init_latents=init, variance_noises=noises)
    out = model.sample(embeds, None, torch.zeros(1, 1), guidance_scale=1.0, callback=records.append, **kw)
    assert records[0].noise_pred_uncond is None
    assert records[0].noise_pred is records[0].noise_pred_cond
    cfg_records: list[DiffusionStep] = []
    model.sample(embeds, None, torch.zeros(1, 1), guidance_scale=3.0, callback=cfg_records.append, **kw)
    assert_close(records[0].noise_pred_cond, cfg_records[0].noise_pred_cond, 1e-5, "conditional branch")
    assert not torch.allclose(out, model.decoder.decode(cfg_records[0].latents_out))


def test_sample_decodes_with_the_vae_dtype(config, weights) -> None:
    """A bfloat16 UNet, MMFSNet and resampler with the VAE kept in float32 (the engine's placement): the final
    latents go to the VAE's device and dtype, and the images equal the diffusers VAE decode of those latents."""
    model = build(config, weights).to(torch.bfloat16)
    model.decoder.vae.float()
    records: list[DiffusionStep] = []
    feats = [f.to(torch.bfloat16) for f in features(model, 1)]
    out = model.sample(
        prompt(model, 1).to(torch.bfloat16),
        feats,
        torch.ones(1, 1),
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(14),
        callback=records.append,
    )
    final = records[-1].latents_out
    assert final.dtype == torch.bfloat16
    vae = model.decoder.vae
    expected = (vae.decode(final.float() / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert out.dtype == torch.float32 and out.device == next(vae.parameters()).device
    assert_close(out, expected, 1e-5, "bf16 UNet latents decoded by the float32 VAE")


@pytest.mark.parametrize("name", sorted(set(SCHEDULERS) - {"ddpm"}))
def test_sample_other_schedulers(model: ImageDecoder, name: str) -> None:
    out = model.sample(
        prompt(model, 1),
        features(model, 1),
        torch.ones(1, 1),
        num_inference_steps=2,
        scheduler=name,
        generator=torch.Generator().manual_seed(13),
    )
    assert out.shape == (1, 3, model.config.image_size, model.config.image_size)
    assert torch.isfinite(out).all() and float(out.min()) >= 0 and float(out.max()) <= 1


def test_sample_callback_cancels(model: ImageDecoder) -> None:
    class Cancelled(Exception):
        pass

    def cancel(step: DiffusionStep) -> None:
        raise Cancelled(step.index)

    with pytest.raises(Cancelled):
        model.sample(prompt(model, 1), None, torch.zeros(1, 1), num_inference_steps=3, callback=cancel)


# --------------------------------------------------------------------------------------------------------------
def test_training_loss_draws_in_official_order(model: ImageDecoder) -> None:
    """Global RNG: cfg uniform [B,1,1], posterior eps, diffusion noise, integer timesteps, in that order."""
    batch = 2
    ctx, ctx_mask = context_inputs(model, batch)
    imgs = images(model, batch)
    latent = model.decoder.latent_shape(*imgs.shape[-2:])
    args = (imgs, ctx, ctx_mask, features(model, batch), torch.tensor([[1], [0]]), torch.ones(batch))
    torch.manual_seed(21)
    with torch.no_grad():
        loss, out = model.training_loss(*args)
    torch.manual_seed(21)
    rand = torch.rand(batch, 1, 1)
    eps, noise = torch.randn(batch, *latent), torch.randn(batch, *latent)
    timesteps = torch.randint(0, 1000, (batch,))
    assert torch.equal(out["cfg_uncond_mask"], (rand < model.config.uncond_prob).flatten())
    assert torch.equal(out["noise"], noise) and torch.equal(out["timesteps"], timesteps)
    expected_latents = (out["vae_posterior_mean"] + out["vae_posterior_std"] * eps) * model.decoder.scaling_factor
    assert_close(out["latents"], expected_latents, 1e-6, "posterior sample")
    with torch.no_grad():
        loss_g, _ = model.training_loss(*args, generator=torch.Generator().manual_seed(21))
    assert_close(loss_g, loss, 0.0, "generator vs global RNG")


def test_training_loss_mask_counts_in_mean(model: ImageDecoder) -> None:
    batch = 3
    ctx, ctx_mask = context_inputs(model, batch)
    imgs = images(model, batch)
    loss_mask = torch.tensor([1.0, 0.0, 1.0])
    with torch.no_grad():
        loss, out = model.training_loss(
            imgs, ctx, ctx_mask, features(model, batch), torch.ones(batch, 1), loss_mask, generator=torch.Generator()
        )
    elementwise = out["loss_elementwise"]
    expected = (elementwise[0].sum() + elementwise[2].sum()) / elementwise.numel()
    assert_close(loss, expected, 1e-6, "masked mean")
    assert_close(elementwise, (out["model_pred"] - out["noise"]) ** 2, 1e-6, "elementwise MSE")


def test_training_gradients_and_checkpointing(config, weights) -> None:
    """Gradients reach UNet, MMFSNet, resampler and (for dropped images) neg_prompt_embeds, never the VAE;
    gradient checkpointing changes nothing."""
    results = []
    for checkpointing in (False, True):
        cfg = dataclasses.replace(
            config, image_decoder=dataclasses.replace(config.image_decoder, gradient_checkpointing=checkpointing)
        )
        model = build(cfg, weights).train()
        batch = 2
        ctx, ctx_mask = context_inputs(model, batch)
        latent = model.decoder.latent_shape(cfg.image_decoder.image_size, cfg.image_decoder.image_size)
        draws = DiffusionDraws.draw(batch, latent, 1000, True, torch.device("cpu"), generator=torch.Generator())
        draws.cfg_uncond_rand = torch.tensor([0.0, 0.9]).view(2, 1, 1)  # drop the first image's conditioning
        loss, _ = model.training_loss(
            images(model, batch), ctx, ctx_mask, features(model, batch), torch.ones(batch, 1), torch.ones(batch), draws
        )
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert not any(n.startswith("decoder.vae.") for n in grads)
        for prefix in ("decoder.unet.", "decoder.mmfs_module.", "perceiver_resampler.", "neg_prompt_embeds"):
            assert any(n.startswith(prefix) for n in grads), prefix
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert_close(loss_b, loss_a, 1e-6, "loss with checkpointing")
    for name in grads_a:
        assert_close(grads_b[name], grads_a[name], 1e-5, name)


# --------------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(model: ImageDecoder) -> None:
    batch = 2
    ctx, ctx_mask = context_inputs(model, batch)
    imgs, feats, mask, loss_mask = images(model, batch), features(model, batch), torch.ones(batch, 1), torch.ones(2)
    with pytest.raises(ValueError, match="images_dec must be"):
        model.training_loss(imgs[:, :1], ctx, ctx_mask, feats, mask, loss_mask)
    with pytest.raises(ValueError, match="images_dec must be"):
        model.training_loss(imgs[..., :-8], ctx, ctx_mask, feats, mask, loss_mask)
    with pytest.raises(ValueError, match="batch mismatch"):
        model.training_loss(imgs, ctx[:1], ctx_mask[:1], feats, mask, loss_mask)
    with pytest.raises(ValueError, match="context_mask"):
        model.prompt_embeds(ctx, ctx_mask[:, :-1])
    with pytest.raises(ValueError, match="feature maps"):
        model.training_loss(imgs, ctx, ctx_mask, feats[:3], mask, loss_mask)
    with pytest.raises(ValueError, match="mmfs feature level 0"):
        model.training_loss(imgs, ctx, ctx_mask, [feats[0][:, :-1], *feats[1:]], mask, loss_mask)
    with pytest.raises(ValueError, match="mmfs_mask must be"):
        model.training_loss(imgs, ctx, ctx_mask, feats, torch.ones(batch, 2), loss_mask)
    with pytest.raises(ValueError, match="no mmfs_features"):
        model.prepare_mmfs(None, mask)
    draws = DiffusionDraws.draw(batch, (4, 2, 2), 1000, True, torch.device("cpu"))
    with pytest.raises(ValueError, match="vae_posterior_eps must have shape"):
        model.training_loss(imgs, ctx, ctx_mask, feats, mask, loss_mask, draws)

    embeds = prompt(model, 1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        model.sample(embeds, None, torch.zeros(1, 1), num_inference_steps=0)
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        model.sample(embeds[:, :-1], None, torch.zeros(1, 1), num_inference_steps=1)
    with pytest.raises(ValueError, match="unknown scheduler"):
        model.sample(embeds, None, torch.zeros(1, 1), num_inference_steps=1, scheduler="plms")
    with pytest.raises(ValueError, match="variance_noises"):
        model.sample(embeds, None, torch.zeros(1, 1), num_inference_steps=2, variance_noises=[torch.zeros(1)])
    with pytest.raises(ValueError, match="does not take injected variance noise"):
        model.sample(embeds, None, torch.zeros(1, 1), num_inference_steps=1, scheduler="euler", variance_noises=[0])
    with pytest.raises(ValueError, match="init_latents must be"):
        model.sample(embeds, None, torch.zeros(1, 1), num_inference_steps=1, init_latents=torch.zeros(1, 4, 3, 3))
    with pytest.raises(ValueError, match="guidance_scale"):
        model.sample(embeds, None, torch.zeros(1, 1), num_inference_steps=1, guidance_scale=-1.0)


def test_sample_refuses_more_steps_than_the_schedule_allows(config: MMInterleavedConfig) -> None:
    decoder = ImageDecoder(config).eval()
    prompt = torch.zeros(1, config.image_decoder.prompt_length, config.image_decoder.resampler.hidden_size)
    with pytest.raises(ValueError, match="cannot take 1000 steps"):
        decoder.sample(prompt, None, None, num_inference_steps=1000, guidance_scale=1.0, scheduler="ddpm")
