"""Diffusion helpers of the image decoder: noise schedulers, injectable random draws, per-step records.

The official model trains and samples with SD-2.1-base's scheduler file loaded into a diffusers
``DDPMScheduler`` (leading timestep spacing, ``steps_offset`` 1, "fixed_small" variance, ε-prediction).
Other diffusers schedulers can be swapped in for sampling via ``from_config``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor


class NoiseInjectableDDPMScheduler(DDPMScheduler):
    """``DDPMScheduler`` whose ``step`` also accepts the variance noise (as DDIM / DPM-Solver do), so a sampling
    run can be replayed exactly. Without ``variance_noise`` it is the stock diffusers step."""

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        variance_noise: torch.Tensor | None = None,
    ):
        if variance_noise is None:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        if self.variance_type in ("learned", "learned_range"):
            raise ValueError("variance_noise injection needs a fixed DDPM variance type, not a learned one")
        if variance_noise.shape != model_output.shape:
            raise ValueError(f"variance_noise {tuple(variance_noise.shape)} != latents {tuple(model_output.shape)}")
        t = int(timestep)
        prev_t = int(self.previous_timestep(t))
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t, beta_prod_prev = 1 - alpha_prod_t, 1 - alpha_prod_prev
        alpha_t = alpha_prod_t / alpha_prod_prev
        beta_t = 1 - alpha_t

        x0 = self._predict_original(model_output, sample, alpha_prod_t, beta_prod_t)
        # DDPM posterior mean (Ho et al. eq. 7) plus the fixed variance times the given noise
        mean = (alpha_prod_prev**0.5 * beta_t / beta_prod_t) * x0 + (
            alpha_t**0.5 * beta_prod_prev / beta_prod_t
        ) * sample
        if t > 0:
            variance = self._get_variance(t)
            scale = variance if self.variance_type == "fixed_small_log" else variance**0.5
            mean = mean + scale * variance_noise.to(mean.dtype)
        return DDPMSchedulerOutput(prev_sample=mean, pred_original_sample=x0) if return_dict else (mean, x0)

    def _predict_original(
        self, model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor, beta_prod_t: torch.Tensor
    ) -> torch.Tensor:
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        elif kind == "sample":
            x0 = model_output
        elif kind == "v_prediction":
            x0 = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        else:
            raise ValueError(f"unknown prediction_type {kind!r}")
        if self.config.thresholding:
            return self._threshold_sample(x0)
        if self.config.clip_sample:
            return x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0


# name -> (class, config overrides applied on top of the model's scheduler config)
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddpm": (NoiseInjectableDDPMScheduler, {}),
    "ddim": (DDIMScheduler, {"set_alpha_to_one": False}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def build_scheduler(config: dict[str, Any], name: str = "ddpm") -> SchedulerMixin:
    """A fresh (stateful) scheduler of kind ``name`` from the model's scheduler config (the official: "ddpm")."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config({**dict(config), **overrides})


@dataclass
class DiffusionDraws:
    """The four random draws of one training step, in the official order (FIXTURES.md section 5.7).

    cfg_uncond_rand [B, 1, 1] U[0, 1) (None when uncond_prob is 0: the official then draws nothing);
    vae_posterior_eps [B, C_lat, h, w] N(0, 1); diffusion_noise [B, C_lat, h, w] N(0, 1);
    timesteps [B] long in [0, num_train_timesteps).
    """

    cfg_uncond_rand: torch.Tensor | None
    vae_posterior_eps: torch.Tensor
    diffusion_noise: torch.Tensor
    timesteps: torch.Tensor

    @classmethod
    def draw(
        cls,
        batch: int,
        latent_shape: tuple[int, int, int],
        num_train_timesteps: int,
        with_cfg_rand: bool,
        device: torch.device,
        cfg_dtype: torch.dtype = torch.float32,
        latent_dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> DiffusionDraws:
        """Draw from ``generator`` (or the global RNG) in the official order."""
        rand = torch.rand(batch, 1, 1, generator=generator, device=device, dtype=cfg_dtype) if with_cfg_rand else None
        eps = torch.randn(batch, *latent_shape, generator=generator, device=device, dtype=torch.float32)
        noise = torch.randn(batch, *latent_shape, generator=generator, device=device, dtype=latent_dtype)
        timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device)
        return cls(rand, eps, noise, timesteps)

    def check(self, batch: int, latent_shape: tuple[int, int, int], with_cfg_rand: bool) -> None:
        expected = {
            "vae_posterior_eps": (batch, *latent_shape),
            "diffusion_noise": (batch, *latent_shape),
            "timesteps": (batch,),
        }
        if with_cfg_rand:
            expected["cfg_uncond_rand"] = (batch, 1, 1)
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is None or tuple(value.shape) != shape:
                got = None if value is None else tuple(value.shape)
                raise ValueError(f"DiffusionDraws.{name} must have shape {shape}, got {got}")


@dataclass
class DiffusionStep:
    """What one sampling step did, passed to the per-step callback (raise from it to cancel sampling).

    noise_pred_uncond is None without classifier-free guidance; noise_pred is the guided prediction. denoised is
    the scheduler's estimate of the clean latents (``pred_original_sample``; None for schedulers that do not give
    one, e.g. DPM-Solver++).
    """

    index: int
    num_steps: int
    timestep: int
    latents_in: torch.Tensor
    noise_pred_uncond: torch.Tensor | None
    noise_pred_cond: torch.Tensor
    noise_pred: torch.Tensor
    latents_out: torch.Tensor
    denoised: torch.Tensor | None = None


StepCallback = Callable[[DiffusionStep], None]


def initial_latents(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Initial noise drawn as the diffusers SD pipeline does (before scaling by ``init_noise_sigma``)."""
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
