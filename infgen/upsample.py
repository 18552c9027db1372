"""Training-free iterative upsampling past the sizes InfGen was trained on.

    I_1 = InfGen(z, 2× native);  z_n = VAE_encoder(I_n);  I_{n+1} = InfGen(z_n, 2× I_n) … until the target.

Each side doubles per step until it reaches its target; the last step may be less than 2×.
"""

from __future__ import annotations

from typing import Optional

import torch

from .models import InfGen, Size
from .vae import FrozenVAE


def iterative_schedule(latent_hw: tuple[int, int], scale: int, target: tuple[int, int]) -> list[tuple[int, int]]:
    """Output size of each step for a latent of `latent_hw` tokens (`scale` px each) and a target (H, W).

    Intermediate sizes are multiples of `scale` so the VAE can re-encode them. A target within 2× of the
    native size is one step.
    """
    current = (latent_hw[0] * scale, latent_hw[1] * scale)
    sizes = []
    while True:
        step = tuple(min(t, 2 * c) for t, c in zip(target, current))
        if step == tuple(target):
            return sizes + [step]
        step = tuple(max(scale, s // scale * scale) for s in step)
        sizes.append(step)
        current = step


@torch.no_grad()
def iterative_decode(model: InfGen, vae: FrozenVAE, latents: torch.Tensor, size: Size,
                     tile: Optional[int] = None, scaled: bool = True) -> torch.Tensor:
    """Decode scaled latents to `size` by repeated 2× decode and VAE re-encode; images in [-1, 1]."""
    if vae.latent_channels != model.config.latent_channels or vae.scale != model.config.scale:
        raise ValueError(f"VAE {vae.name!r} ({vae.latent_channels} channels, ×{vae.scale}) does not match the "
                         f"model's latent space ({model.config.latent_channels} channels, ×{model.config.scale})")
    if not scaled:
        latents = latents * model.config.scaling_factor
    schedule = iterative_schedule(tuple(latents.shape[2:]), model.config.scale, model.check_inputs(latents, size))
    for i, step_size in enumerate(schedule):
        images = model.decode(latents, step_size, tile=tile)
        if i < len(schedule) - 1:
            latents = vae.encode(images.to(vae.device)).to(latents.device)
    return images
