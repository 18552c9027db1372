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
import time
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from .machine import describe_machine
from .paths import cache_dir

log = logging.getLogger(__name__)

# Offline VAEs: diffusers AutoencoderKLs built from a config (the SD VAE's layout, scaled down), fitted here
# once, saved under the cache and loaded back through from_pretrained like any VAE.
#   tiny:  0.3M parameters, ~1 min on the photos Python packages ship: fast unit tests only.
#   photo: the realistic one: fitted on the TRAINING wallpaper photos (conf/photos.yaml), never on held-out
#          files; what benchmarks/quality.py, the demo and the evaluation use.
_SD_BLOCKS = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
                  # global attention in the mid block is quadratic in latent tokens: too slow on a CPU
                  mid_block_add_attention=False)
OFFLINE_VAES: dict[str, dict] = {
    "tiny": dict(config=dict(_SD_BLOCKS, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8),
                 fit=dict(photos="shipped", phases=[[64, 16, 500]], lr=3e-3, kl_weight=1e-4, logvar_init=None),
                 seed=0),
    "photo": dict(config=dict(_SD_BLOCKS, block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=16),
                  # most steps on 32-px crops (cheap), then 128-px ones: GroupNorm's statistics of a 32-px
                  # crop differ from a whole image's (the 32-px model alone: ~16 dB at 128 px). Held-out PSNR
                  # (48 crops of the 12 held-out files, 128 px, benchmarks/quality.py) over seeds 0-3:
                  # 23.6/25.7/25.5/25.2 dB with these 2,400 + 600 steps, 23.4/24.1/23.1 (seeds 0-2) with
                  # 1,200 + 400. The second phase must stay at the decayed learning rate (a restarted warm-up
                  # and cosine lost 4 dB), wider low levels (32,32,64,64) did not help, lr 2e-3 + clipping
                  # fell to 19.9. Seed 1: the best of the four on 32 crops of TRAINING photos (28.9 dB).
                  fit=dict(photos="train", phases=[[32, 16, 2400], [128, 4, 600]], lr=1e-3, kl_weight=1e-6,
                           logvar_init=-6.0),
                  seed=1),
}


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
        # channels-last: the CPU convolutions (oneDNN) took 0.6× the time of NCHW here (0.75× for decode)
        images = images.to(self.device, self.dtype, memory_format=torch.channels_last)
        dist = self.autoencoder.encode(images).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return ((z - self.shift_factor) * self.scaling_factor).float().contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [-1, 1] at the VAE's native size (8× the latent)."""
        z = latents.to(self.device, self.dtype, memory_format=torch.channels_last)  # as in encode
        z = z / self.scaling_factor + self.shift_factor
        return self.autoencoder.decode(z).sample.float().clamp(-1, 1).contiguous()


def vae_source(name_or_path: Union[str, Path], subfolder: Optional[str] = None) -> str:
    """Where a VAE loads from: an offline VAE's cached directory (fitted first if it is not cached), a local
    diffusers directory, or a Hugging Face Hub id. Raises ValueError, before any network call, for a directory
    without config.json, or a name that is none of these (a hub id is owner/name)."""
    source = str(name_or_path)
    if source in OFFLINE_VAES:
        return str(materialise_offline_vae(source))
    if Path(source).exists():
        if not (Path(source) / (subfolder or "") / "config.json").is_file():
            raise ValueError(f"{source}: not a diffusers VAE directory (no config.json"
                             f"{' in ' + subfolder if subfolder else ''})")
        return source
    if "/" not in source:  # neither a file nor a hub id: a typo, not something to ask the network for
        raise ValueError(f"vae={source!r} is not an offline VAE ({', '.join(sorted(OFFLINE_VAES))}), a local "
                         f"directory or a hub id (owner/name)")
    return source


def vae_config(name_or_path: Union[str, Path], subfolder: Optional[str] = None) -> tuple[str, dict]:
    """(local source, config) of a diffusers AutoencoderKL without its weights: latent_channels, block_out_channels
    (the ×2^(levels-1) scale), scaling_factor (absent in old configs: SD's 0.18215, as diffusers assumes). An
    offline VAE (OFFLINE_VAES) is fitted first if it is not cached. Raises ValueError naming the source when its
    config cannot be read."""
    from diffusers import AutoencoderKL

    source = vae_source(name_or_path, subfolder)
    try:
        config = dict(AutoencoderKL.load_config(source, subfolder=subfolder))
    except (OSError, ValueError) as e:
        raise ValueError(f"vae={str(name_or_path)!r} could not be loaded ({e}). Offline, pass a local diffusers "
                         f"directory or an offline VAE ({', '.join(sorted(OFFLINE_VAES))}).") from None
    config.setdefault("scaling_factor", 0.18215)
    return source, config


def load_vae(name_or_path: Union[str, Path], subfolder: Optional[str] = None,
             dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> FrozenVAE:
    """Load a diffusers AutoencoderKL: a hub id, a local directory (optionally its `subfolder`, e.g. "vae"
    inside a whole pipeline), or the name of an offline VAE ("photo", "tiny": see OFFLINE_VAES), fitted
    on first use and cached. Raises ValueError naming the source when it cannot be loaded."""
    from diffusers import AutoencoderKL

    source = vae_source(name_or_path, subfolder)
    try:
        autoencoder = AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype)
    except OSError as e:
        raise ValueError(f"could not load VAE {name_or_path!r}: {e}. Offline, pass a local diffusers "
                         f"directory or one of {sorted(OFFLINE_VAES)}.") from None
    return FrozenVAE(autoencoder.to(device), name=str(name_or_path))


def build_offline_vae(name: str) -> nn.Module:
    """The named offline AutoencoderKL, randomly initialised, deterministic for its seed."""
    from diffusers import AutoencoderKL

    if name not in OFFLINE_VAES:
        raise ValueError(f"unknown offline VAE {name!r}; choose one of {sorted(OFFLINE_VAES)}")
    torch.manual_seed(OFFLINE_VAES[name]["seed"])
    return AutoencoderKL(**OFFLINE_VAES[name]["config"])


def fit_vae(autoencoder: nn.Module, seed: int, photos: str, phases: list[list[int]], lr: float, kl_weight: float,
            logvar_init: Optional[float]) -> nn.Module:
    """Fit an AutoencoderKL on random square crops of photos, then set its scaling factor to 1/std of the
    latents (how SD's 0.18215 was chosen, Rombach et al. 2022, sec. G).

    photos: "train" (the wallpaper photos' training split, conf/photos.yaml) or "shipped" (the photos Python
    packages ship). phases: [crop, batch size, steps] run in order; a crop is a region of log-uniform side
    (every scale from `crop` px to the whole short side) resized to crop×crop. Loss: L1 + L2 + kl_weight·KL (summed KL per image / pixels), on a posterior sample.
    Adam with 50 warm-up steps and cosine decay. logvar_init: start the posterior's log-variance there
    (zero weights, constant bias in quant_conv) instead of ~0: a unit-variance sample drowns the young
    latent in noise and the fit barely learns in a few thousand steps.
    """
    import math
    import random

    from .images import random_region, region_at, shipped_photos
    from .photos import load_photos, open_rgb

    rng = random.Random(seed)
    images = (list(shipped_photos().values()) if photos == "shipped"
              else [open_rgb(p.path, max_side=4096) for p in load_photos(photos)])

    def batch(crop: int, batch_size: int) -> torch.Tensor:
        regions = []
        for _ in range(batch_size):
            image = rng.choice(images)
            regions.append(region_at(image, random_region(*image.size, rng, min_side=crop), crop))
        return torch.stack(regions)

    if logvar_init is not None:
        with torch.no_grad():
            half = autoencoder.quant_conv.out_channels // 2
            autoencoder.quant_conv.weight[half:].zero_()
            autoencoder.quant_conv.bias[half:].fill_(logvar_init)
    plan = [(crop, batch_size) for crop, batch_size, steps in phases for _ in range(steps)]
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / 50) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * i / len(plan)))))
    autoencoder.train()
    # a progress line every tenth of the steps (a fit takes minutes); the ETA counts pixels, which a step's time
    # is about proportional to
    every, start, pixels, done = max(1, len(plan) // 10), time.time(), sum(c * c * b for c, b in plan), 0
    for step, (crop, batch_size) in enumerate(plan, 1):
        x = batch(crop, batch_size)
        posterior = autoencoder.encode(x).latent_dist
        y = autoencoder.decode(posterior.sample()).sample
        loss = (y - x).abs().mean() + (y - x).pow(2).mean() + kl_weight * posterior.kl().mean() / x[0].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        done += crop * crop * batch_size
        if step % every == 0:
            elapsed = time.time() - start
            log.info("VAE fit: step %d/%d, loss %.4f, %.0f s, ETA %.0f s", step, len(plan), loss.item(), elapsed,
                     elapsed * (pixels - done) / done)
    autoencoder.eval()
    with torch.no_grad():
        std = torch.cat([autoencoder.encode(batch(*phases[-1][:2])).latent_dist.mode() for _ in range(8)]).std().item()
    autoencoder.register_to_config(scaling_factor=round(1.0 / std, 5))
    return autoencoder


def materialise_offline_vae(name: str) -> Path:
    """Fit and save the named offline VAE once under the cache and return its directory (atomic: safe for
    parallel workers)."""
    spec = OFFLINE_VAES[name]
    # the name hashes the whole spec, so a changed config or recipe never reuses a stale copy
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    target = cache_dir() / f"vae-{name}-{digest}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        rng_state = torch.get_rng_state()
        log.warning("fitting the offline %r VAE (once, %d steps) into %s", name,
                    sum(phase[2] for phase in spec["fit"]["phases"]), target)
        start = time.time()
        try:
            autoencoder = fit_vae(build_offline_vae(name), spec["seed"], **spec["fit"])
        finally:
            torch.set_rng_state(rng_state)
        autoencoder.save_pretrained(tmp)
        (Path(tmp) / "fit.json").write_text(json.dumps({**spec, "seconds": round(time.time() - start, 1),
                                                        "machine": describe_machine()}, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: its copy is identical
            if not (target / "config.json").is_file():
                raise
        else:
            os.makedirs(tmp)  # so TemporaryDirectory's cleanup finds its directory
    return target

