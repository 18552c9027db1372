"""The frozen Stable Diffusion VAE: the encoder makes training latents, the decoder is the baseline.

`load_vae` goes through diffusers' `AutoencoderKL.from_pretrained` for everything: a hub id on a machine with
internet (e.g. "stabilityai/sd-vae-ft-ema"), a local diffusers directory, or "tiny": a small VAE that is
built from a config, fitted for about a minute on the photos that installed packages ship, saved, and loaded
back through the same call. It needs no download, so tests and the demo run offline. (A purely random VAE
will not do: its GroupNorm layers erase colour and contrast, so its latents hold almost nothing to decode.)
It reconstructs at ~20 dB PSNR: a real but weak baseline, never one to quote against the SD VAE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

TINY_VAE = "tiny"
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=512,
    # global attention in the mid block is quadratic in latent tokens: too slow for CPU at 256² latents
    mid_block_add_attention=False,
)
TINY_VAE_SEED = 0
TINY_VAE_FIT = dict(steps=500, batch_size=16, crop=64, lr=3e-3, kl_weight=1e-4)


def cache_dir() -> Path:
    return Path(os.environ.get("INFGEN_CACHE", Path.home() / ".cache" / "infgen"))


class FrozenVAE(nn.Module):
    """An AutoencoderKL with frozen weights, speaking in scaled latents (what diffusion models produce)."""

    def __init__(self, autoencoder: nn.Module, name: str = "") -> None:
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.name = name
        config = autoencoder.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.latent_channels = int(config.latent_channels)
        self.scale = 2 ** (len(config.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1], H and W multiples of 8 → scaled latents (B, 4, H/8, W/8), float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (batch, 3, H, W), got {tuple(images.shape)}")
        if images.shape[2] % self.scale or images.shape[3] % self.scale:
            raise ValueError(f"image size {tuple(images.shape[2:])} is not a multiple of {self.scale}")
        dist = self.autoencoder.encode(images.to(self.device, self.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [-1, 1] at the VAE's native size (8× the latent)."""
        z = latents.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        return self.autoencoder.decode(z).sample.float().clamp(-1, 1)


def load_vae(name_or_path: Union[str, Path], subfolder: Optional[str] = None,
             dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> FrozenVAE:
    """Load a diffusers AutoencoderKL: a hub id, a local directory (optionally its `subfolder`, e.g. "vae"
    inside a whole pipeline), or "tiny" for the small random one."""
    from diffusers import AutoencoderKL

    source = str(name_or_path)
    if source == TINY_VAE:
        source = str(materialise_tiny_vae())
    elif Path(source).exists() and not (Path(source) / (subfolder or "") / "config.json").is_file():
        raise ValueError(f"{source}: not a diffusers VAE directory (no config.json"
                         f"{' in ' + subfolder if subfolder else ''})")
    try:
        autoencoder = AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype)
    except OSError as e:
        raise ValueError(f"could not load VAE {name_or_path!r}: {e}. Offline, pass a local diffusers "
                         f"directory or 'tiny'.") from None
    return FrozenVAE(autoencoder.to(device), name=str(name_or_path))


def build_tiny_vae(seed: int = TINY_VAE_SEED) -> nn.Module:
    """The small AutoencoderKL (0.3M parameters), randomly initialised, deterministic for a seed."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE_CONFIG)


def fit_tiny_vae(autoencoder: nn.Module, seed: int, steps: int, batch_size: int, crop: int, lr: float,
                 kl_weight: float) -> nn.Module:
    """Fit the autoencoder on random crops of the shipped photos (L1 + L2 + small KL), then set its
    scaling factor to 1/std of the latents, as SD's 0.18215 was chosen."""
    import random

    from PIL import Image

    from .data import random_crop_box
    from .images import shipped_photos, to_tensor

    rng, photos = random.Random(seed), list(shipped_photos().values())

    def batch() -> torch.Tensor:
        crops = []
        for _ in range(batch_size):
            photo = rng.choice(photos)
            box = random_crop_box(*photo.size, rng, min_side=crop)
            crops.append(to_tensor(photo.crop(box).resize((crop, crop), Image.BICUBIC)))
        return torch.stack(crops)

    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    autoencoder.train()
    for _ in range(steps):
        x = batch()
        posterior = autoencoder.encode(x).latent_dist
        y = autoencoder.decode(posterior.sample()).sample
        loss = (y - x).abs().mean() + (y - x).pow(2).mean() + kl_weight * posterior.kl().mean() / x[0].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    autoencoder.eval()
    with torch.no_grad():
        std = torch.cat([autoencoder.encode(batch()).latent_dist.mode() for _ in range(4)]).std().item()
    autoencoder.register_to_config(scaling_factor=round(1.0 / std, 5))
    return autoencoder


def materialise_tiny_vae(seed: int = TINY_VAE_SEED) -> Path:
    """Fit and save the tiny VAE once under the cache and return its directory (atomic: safe for parallel workers)."""
    # the name hashes the config, so a changed TINY_VAE_CONFIG never reuses a stale copy
    digest = hashlib.sha256(json.dumps([TINY_VAE_CONFIG, TINY_VAE_FIT, seed], sort_keys=True).encode()).hexdigest()[:10]
    target = cache_dir() / f"vae-tiny-{digest}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        rng_state = torch.get_rng_state()
        log.info("fitting the tiny VAE on the shipped photos (once, ~1 min) into %s", target)
        try:
            fit_tiny_vae(build_tiny_vae(seed), seed, **TINY_VAE_FIT).save_pretrained(tmp)
        finally:
            torch.set_rng_state(rng_state)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: its copy is identical
            if not (target / "config.json").is_file():
                raise
        else:
            os.makedirs(tmp)  # so TemporaryDirectory's cleanup finds its directory
    return target
