"""Training the image decoder's VAE (``AutoencoderKL``) from scratch, for models whose VAE is not SD's.

The official model uses SD-2.1's pretrained, frozen VAE. A model trained from scratch on a new kind of image (the
embedded ShapeStories model) first trains its own VAE on images alone, then freezes it for the main run, as SD did.
Loss: L1 + MSE reconstruction of a posterior sample plus a small KL term (keeps the latent space smooth enough for
diffusion). :func:`latent_scaling_factor` then sets ``scaling_factor`` so that the scaled latents have unit
standard deviation, as SD's 0.18215 does for its VAE.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL


@dataclass
class AutoencoderTraining:
    steps: int = 1500
    lr: float = 1e-3
    warmup_steps: int = 50
    kl_weight: float = 1e-6
    max_grad_norm: float = 1.0
    log_every: int = 50


def autoencoder_loss(
    vae: AutoencoderKL, images: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """images [B, 3, S, S] in [-1, 1] -> (loss, {"l1", "mse", "kl"})."""
    posterior = vae.encode(images).latent_dist
    latents = posterior.sample(generator)
    recon = vae.decode(latents).sample
    l1 = F.l1_loss(recon, images)
    mse = F.mse_loss(recon, images)
    kl = posterior.kl().mean() / latents[0].numel()
    loss = l1 + mse + kl_weight * kl
    return loss, {"l1": float(l1.detach()), "mse": float(mse.detach()), "kl": float(kl.detach())}


def train_autoencoder(
    vae: AutoencoderKL,
    batches: Iterator[torch.Tensor],
    settings: AutoencoderTraining,
    seed: int = 0,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``vae`` in place on ``batches`` ([B, 3, S, S] in [-1, 1]); AdamW, warm-up then cosine decay.

    Returns the logged rows (step, loss, l1, mse, kl, lr, seconds)."""
    vae.train().requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)

    def lr_at(step: int) -> float:
        if step < settings.warmup_steps:
            return settings.lr * (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    rows: list[dict[str, float]] = []
    start = time.perf_counter()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss, parts = autoencoder_loss(vae, next(batches), settings.kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            row = {"step": step + 1, "loss": float(loss.detach()), **parts, "lr": lr_at(step)}
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            if on_log is not None:
                on_log(row)
    vae.eval().requires_grad_(False)
    return rows


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None) -> float:
    """1 / std of posterior samples of ``images`` ([B, 3, S, S] in [-1, 1]): scaled latents get unit variance."""
    latents = vae.encode(images).latent_dist.sample(generator)
    return float(1.0 / latents.flatten().std())


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean absolute error (in [0, 1] pixel units) of decoding the posterior mean of ``images`` ([-1, 1])."""
    recon = vae.decode(vae.encode(images).latent_dist.mean).sample
    return float((recon.clamp(-1, 1) - images).abs().mean() / 2)
