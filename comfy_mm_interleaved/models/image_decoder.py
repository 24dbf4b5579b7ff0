"""The image decoder: LLM context -> 77 x D prompt embeddings -> SD UNet (+ MMFSNet) diffusion, frozen VAE.

State-dict layout (official): ``perceiver_resampler.*`` (Q-Former), ``neg_prompt_embeds`` [1, 77, D],
``decoder.unet.*`` (plain diffusers ``UNet2DConditionModel``), ``decoder.vae.*`` (``AutoencoderKL``),
``decoder.mmfs_module.*`` (:class:`MMFSNet`). The noise scheduler is configuration, not weights.

Training (:meth:`ImageDecoder.training_loss`, OFFICIAL_MODEL.md sections 1.6-1.7): CFG drop of the whole
conditioning to ``neg_prompt_embeds``, fp32 VAE encode, posterior sample x scaling factor, DDPM noising, UNet+MMFS
ε-prediction, per-element MSE x loss mask, mean over every element. Sampling (:meth:`ImageDecoder.sample`,
section 5.2): CFG batch [negative, conditional] sharing the MMFS features, DDPM (or another diffusers scheduler),
fp32 VAE decode.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from ..config import ImageDecoderConfig, MMInterleavedConfig
from .diffusion import DiffusionDraws, DiffusionStep, StepCallback, build_scheduler, initial_latents
from .qformer import QFormerResampler
from .unet_mmfs import MMFSNet, MMFSNetContext, check_sd_family_unet, unet_forward_with_mmfs

Generator = torch.Generator | list[torch.Generator] | None


class StableDiffusionMMFS(nn.Module):
    """The official ``decoder``: ``unet``, frozen ``vae``, ``mmfs_module`` and the (non-module) noise scheduler."""

    def __init__(self, config: ImageDecoderConfig, feature_dim: int) -> None:
        super().__init__()
        self.config = config
        self.unet = UNet2DConditionModel.from_config(config.unet)
        check_sd_family_unet(self.unet)
        self.vae = AutoencoderKL.from_config(config.vae).requires_grad_(False)
        self.mmfs_module = MMFSNet(config, feature_dim)
        self.noise_scheduler = build_scheduler(config.scheduler, "ddpm")
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.mmfs_module.set_gradient_checkpointing(True)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.unet.config.in_channels, height // factor, width // factor)

    def denoise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | int,
        encoder_hidden_states: torch.Tensor,
        context: MMFSNetContext,
        trace: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """UNet + MMFSNet model output (ε for the official model) [B, C_lat, h, w]."""
        return unet_forward_with_mmfs(
            self.unet, latents, timestep, encoder_hidden_states, self.mmfs_module, context, trace
        )

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] in [-1, 1] -> VAE posterior (mean, std) [B, C_lat, h, w], in the VAE's dtype
        (float32 as official: keep the VAE in float32), in mini-batches of ``vae_encode_batch_size``."""
        dtype = self.vae.dtype
        means, stds = [], []
        for chunk in images.split(self.config.vae_encode_batch_size):
            posterior = self.vae.encode(chunk.to(dtype)).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
        return torch.cat(means), torch.cat(stds)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, C_lat, h, w] -> images [B, 3, H, W] in [0, 1], on the VAE's device and in its dtype
        (float32 as official), which may differ from the UNet's."""
        latents = (1.0 / self.scaling_factor) * latents.to(self.vae.device, self.vae.dtype)
        images = self.vae.decode(latents, return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1)


class ImageDecoder(nn.Module):
    """``image_decoder.*`` of the official checkpoint."""

    def __init__(self, config: MMInterleavedConfig) -> None:
        super().__init__()
        cfg = config.image_decoder
        self.config = cfg
        embed_dim = cfg.resampler.hidden_size
        cross_dim = cfg.unet["cross_attention_dim"]
        if embed_dim != cross_dim:
            raise ValueError(f"image_decoder resampler hidden_size {embed_dim} != UNet cross_attention_dim {cross_dim}")
        self.perceiver_resampler = QFormerResampler(cfg.resampler)
        self.neg_prompt_embeds = nn.Parameter(torch.empty(1, cfg.prompt_length, embed_dim))
        nn.init.normal_(self.neg_prompt_embeds, std=0.02)  # the release stores SD's text-encoder("") here
        self.decoder = StableDiffusionMMFS(cfg, config.image_embed_dim)

    @property
    def mmfs_module(self) -> MMFSNet:
        return self.decoder.mmfs_module

    # ------------------------------------------------------------------------------------------------------
    def prompt_embeds(self, context_features: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """context_features [B, L, D_llm], context_mask [B, L] (1 = real row) -> prompt embeds [B, 77, D]."""
        if context_mask is not None and context_mask.shape != context_features.shape[:2]:
            raise ValueError(
                f"context_mask {tuple(context_mask.shape)} must be [B, L] = {tuple(context_features.shape[:2])}"
            )
        return self.perceiver_resampler(context_features, context_mask)

    def prepare_mmfs(self, features: Sequence[torch.Tensor] | None, mask: torch.Tensor | None) -> MMFSNetContext:
        """MMFS values of each entry's source image, computed once and reused by every UNet call."""
        if mask is None:
            if features is not None:
                raise ValueError("mmfs_features were given without mmfs_mask [B, 1]")
            raise ValueError("pass mmfs_mask [B, 1] (zeros when no entry has a source image)")
        return self.mmfs_module.prepare(features, mask)

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"images_dec must be [B, 3, {size}, {size}] in [0, 1], got {tuple(images.shape)}")

    # ------------------------------------------------------------------------------------------------------
    def training_loss(
        self,
        images_dec: torch.Tensor,
        context_features: torch.Tensor,
        context_mask: torch.Tensor,
        mmfs_features: Sequence[torch.Tensor] | None,
        mmfs_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        draws: DiffusionDraws | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Diffusion loss of a batch of images (one per <BOI>).

        images_dec [B, 3, S, S] in [0, 1]; context_features [B, L, D_llm]; context_mask [B, L];
        mmfs_features: 4 maps [B, C_img, h_l, w_l] of each entry's source image; mmfs_mask [B, 1];
        loss_mask [B] (0 drops an image, e.g. image-first ones whose context is <s><BOI> only);
        draws: the four random draws to inject (else drawn from ``generator`` / the global RNG, official order).
        Returns the scalar loss (mean over ALL elements, masked ones included) and the intermediates.
        """
        self._check_images(images_dec)
        batch = images_dec.shape[0]
        if context_features.shape[0] != batch or loss_mask.shape != (batch,):
            raise ValueError(
                f"batch mismatch: images_dec {batch}, context_features {context_features.shape[0]}, "
                f"loss_mask {tuple(loss_mask.shape)} (expected [{batch}])"
            )
        decoder = self.decoder
        scheduler = decoder.noise_scheduler
        unet_dtype = decoder.unet.dtype
        latent_shape = decoder.latent_shape(*images_dec.shape[-2:])
        with_cfg = self.config.uncond_prob > 0
        if draws is None:
            draws = DiffusionDraws.draw(
                batch,
                latent_shape,
                scheduler.config.num_train_timesteps,
                with_cfg,
                images_dec.device,
                cfg_dtype=self.neg_prompt_embeds.dtype,
                latent_dtype=unet_dtype,
                generator=generator,
            )
        draws.check(batch, latent_shape, with_cfg)

        prompt = self.prompt_embeds(context_features, context_mask)
        hidden = prompt
        out: dict[str, torch.Tensor] = {"prompt_embeds": prompt}
        if with_cfg:
            uncond = draws.cfg_uncond_rand.to(prompt.device) < self.config.uncond_prob  # [B, 1, 1]
            hidden = torch.where(uncond, self.neg_prompt_embeds.to(prompt.dtype), prompt)
            out["cfg_uncond_mask"] = uncond.flatten()

        with torch.no_grad():
            mean, std = decoder.encode((images_dec - 0.5) / 0.5)  # not in place on the caller's tensor
            eps = draws.vae_posterior_eps.to(mean)
            latents = ((mean + std * eps).to(unet_dtype)) * decoder.scaling_factor
            noise = draws.diffusion_noise.to(latents)
            timesteps = draws.timesteps.to(latents.device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            target = self._training_target(latents, noise, timesteps)

        context = self.prepare_mmfs(mmfs_features, mmfs_mask)
        trace: dict[str, torch.Tensor] = {}
        pred = decoder.denoise(noisy, timesteps, hidden, context, trace)
        loss_elementwise = F.mse_loss(pred.float(), target.float(), reduction="none")
        loss = (loss_elementwise * loss_mask.to(loss_elementwise)[:, None, None, None]).mean()
        out.update(
            encoder_hidden_states=hidden,
            vae_posterior_mean=mean,
            vae_posterior_std=std,
            latents=latents,
            noise=noise,
            timesteps=timesteps,
            noisy_latents=noisy,
            model_pred=pred,
            target=target,
            loss_elementwise=loss_elementwise,
        )
        out.update({f"mmfs.{name}": value for name, value in trace.items()})
        return loss, out

    def _training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        kind = self.decoder.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.decoder.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        prompt_embeds: torch.Tensor,
        mmfs_features: Sequence[torch.Tensor] | None,
        mmfs_mask: torch.Tensor,
        *,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        scheduler: str = "ddpm",
        generator: Generator = None,
        init_latents: torch.Tensor | None = None,
        variance_noises: Sequence[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Generate images [B, 3, S, S] in [0, 1] from prompt embeds [B, 77, D] (official defaults: DDPM, 30 steps,
        guidance 7.5).

        mmfs_features / mmfs_mask: as in :meth:`training_loss` (both CFG branches use them). Random draws come from
        ``generator`` (init latents first, then one variance noise per stochastic step, as the diffusers pipeline),
        or are injected: ``init_latents`` [B, C_lat, h, w] (unit normal, before ``init_noise_sigma``) and
        ``variance_noises`` (one [B, C_lat, h, w] per step; schedulers whose step takes ``variance_noise``).
        ``guidance_scale`` <= 1 runs the conditional branch only (as the official pipeline).
        ``callback`` gets a :class:`DiffusionStep` after every step; raise from it to cancel.
        """
        batch, device = prompt_embeds.shape[0], prompt_embeds.device
        decoder = self.decoder
        dtype = decoder.unet.dtype
        size = self.config.image_size
        latent_shape = (batch, *decoder.latent_shape(size, size))
        expected_prompt = (self.config.prompt_length, self.neg_prompt_embeds.shape[-1])
        if prompt_embeds.dim() != 3 or tuple(prompt_embeds.shape[1:]) != expected_prompt:
            raise ValueError(
                f"prompt_embeds must be [B, {expected_prompt[0]}, {expected_prompt[1]}], "
                f"got {tuple(prompt_embeds.shape)}"
            )
        if not 1 <= num_inference_steps <= decoder.noise_scheduler.config.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps], got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if variance_noises is not None and len(variance_noises) != num_inference_steps:
            raise ValueError(f"variance_noises: expected {num_inference_steps} tensors, got {len(variance_noises)}")

        sched = build_scheduler(self.config.scheduler, scheduler)
        sched.set_timesteps(num_inference_steps, device=device)
        train_steps = sched.config.num_train_timesteps
        if int(sched.timesteps.max()) >= train_steps:  # e.g. DDPM/DDIM "leading" spacing + steps_offset at 1000 steps
            raise ValueError(
                f"scheduler {scheduler!r} cannot take {num_inference_steps} steps: its timesteps would pass the "
                f"{train_steps} training timesteps; use at most {num_inference_steps - 1} steps or another scheduler"
            )
        step_params = inspect.signature(sched.step).parameters
        if variance_noises is not None and "variance_noise" not in step_params:
            raise ValueError(f"scheduler {scheduler!r} does not take injected variance noise")

        if init_latents is None:
            init_latents = initial_latents(latent_shape, generator, device, dtype)
        elif tuple(init_latents.shape) != latent_shape:
            raise ValueError(f"init_latents must be {latent_shape}, got {tuple(init_latents.shape)}")
        latents = init_latents.to(device, dtype) * sched.init_noise_sigma

        do_cfg = guidance_scale > 1.0
        hidden = prompt_embeds.to(dtype)
        context = self.prepare_mmfs(mmfs_features, mmfs_mask)
        if do_cfg:
            negative = self.neg_prompt_embeds if negative_prompt_embeds is None else negative_prompt_embeds
            hidden = torch.cat([negative.to(hidden).expand_as(hidden), hidden])
            context = context.repeat_batch(2)

        for i, t in enumerate(sched.timesteps):
            model_in = sched.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
            pred = decoder.denoise(model_in, t, hidden, context)
            uncond, cond = pred.chunk(2) if do_cfg else (None, pred)
            guided = uncond + guidance_scale * (cond - uncond) if do_cfg else cond
            kwargs = {}
            if "generator" in step_params:
                kwargs["generator"] = generator
            if variance_noises is not None:
                kwargs["variance_noise"] = variance_noises[i].to(device, dtype)
            out = sched.step(guided, t, latents, **kwargs, return_dict=False)
            new_latents, denoised = out[0], (out[1] if len(out) > 1 else None)
            if callback is not None:
                predictions = (uncond, cond, guided)
                callback(DiffusionStep(i, num_inference_steps, int(t), latents, *predictions, new_latents, denoised))
            latents = new_latents
        return decoder.decode(latents)
