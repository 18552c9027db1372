"""InfGen as a diffusers pipeline's `vae`: `pipe(prompt).images[0]` comes out at the size you ask for.

    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    pipe.vae = InfGenVAE(InfGen.from_pretrained("path/to/model"), pipe.vae, size=(2048, 2048))
    image = pipe("a lighthouse at dawn").images[0]          # a 2048×2048 PIL image

diffusers pipelines call `vae.decode(latents / vae.config.scaling_factor)` and read `vae.config`
(scaling_factor, block_out_channels for the latent size); img2img and inpainting call `vae.encode`. The adapter
decodes with InfGen at `size` (None: the VAE's own 8× the latent) and leaves `encode` to the original VAE, so
the diffusion model, its latents and its image processor are untouched (InfGen paper: no retraining).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from .models import InfGen, parse_size


class InfGenVAE(nn.Module):
    """A drop-in for `pipe.vae` (AutoencoderKL's interface as the SD, SD 2 and SDXL pipelines use it).

    model: an InfGen trained in the VAE's latent space (same scaling factor); vae: the pipeline's original
    AutoencoderKL, kept for `encode` and its config (None: decode only); size: output (height, width) or an int
    for squares, None for 8× the latent; tile: decode in tiles of this many output pixels (same result, memory
    bounded by the tile). Raises ValueError when the model and the VAE disagree on the latent space.
    """

    def __init__(self, model: InfGen, vae: Optional[nn.Module] = None,
                 size: Optional[Union[int, tuple[int, int]]] = None, tile: Optional[int] = None) -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        c = model.config
        self.model = model.eval()
        self.vae = vae
        self.size = None if size is None else parse_size(size, c.max_size)
        self.tile = tile
        config = dict(vae.config) if vae is not None else {
            "latent_channels": c.latent_channels, "scaling_factor": c.scaling_factor,
            "block_out_channels": [128, 256, 512, 512], "latents_mean": None, "latents_std": None}
        if config["latent_channels"] != c.latent_channels or abs(config["scaling_factor"] - c.scaling_factor) > 1e-6:
            raise ValueError(f"the InfGen model decodes {c.latent_channels}-channel latents with scaling factor "
                             f"{c.scaling_factor}, the VAE has {config['latent_channels']} channels and "
                             f"{config['scaling_factor']}: a model trained for another latent space")
        # InfGen takes fp16/bf16 latents itself: no pipeline up-casting of a VAE it does not have
        config["force_upcast"] = False
        self.config = FrozenDict(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.mask_token.dtype

    @property
    def device(self) -> torch.device:
        return self.model.mask_token.device

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """The original VAE's encode (img2img, inpainting); ValueError without one."""
        if self.vae is None:
            raise ValueError("InfGenVAE was built without the original VAE: pass it to encode images")
        return self.vae.encode(x, return_dict=return_dict)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Optional[torch.Generator] = None):
        """Unscaled latents (B, C, h, w), any float dtype, as pipelines pass them (÷ scaling_factor) → images
        (B, 3, H, W) in [-1, 1] at `size`, in z's dtype, as `DecoderOutput(sample=...)` or a 1-tuple."""
        from diffusers.models.autoencoders.vae import DecoderOutput

        size = self.size or (8 * z.shape[-2], 8 * z.shape[-1])
        images = self.model.decode(z, size, tile=self.tile, scaled=False).to(z.dtype)
        return DecoderOutput(sample=images) if return_dict else (images,)
