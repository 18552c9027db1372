"""Training pairs (latent of a crop, the same crop at high resolution) and per-batch target sizes.

The cluster pipeline makes these pairs with Ray Data from LAION; `photo_pairs` makes them in memory from a
few images (tests, the demo) the same way: random crop → resize to the VAE input size → encode; keep the
crop at high resolution; each batch is resized (antialiased) to one target size.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import torch
from PIL import Image

from .images import output_size, resize, to_tensor
from .vae import FrozenVAE


def random_crop_box(width: int, height: int, rng: random.Random, min_side: int,
                    aspect_range: tuple[float, float] = (1.0, 1.0)) -> tuple[int, int, int, int]:
    """A random crop (left, top, right, bottom) with width/height in aspect_range and short side >= min_side."""
    aspect = rng.uniform(*aspect_range)
    max_h = min(height, int(width / aspect))
    min_h = max(min_side, math.ceil(min_side / aspect))  # aspect < 1: the width is the short side
    if max_h < min_h:
        raise ValueError(f"image {width}×{height} is too small for a {min_side}-pixel crop of aspect {aspect:.2f}")
    ch = rng.randint(min_h, max_h)
    cw = round(ch * aspect)
    left, top = rng.randint(0, width - cw), rng.randint(0, height - ch)
    return left, top, left + cw, top + ch


def target_window(image: Image.Image, size: tuple[int, int],
                  region: Optional[tuple[int, int, int, int]] = None) -> torch.Tensor:
    """`image` resized (Pillow bicubic, antialiased) to size (H, W): (3, H, W) in [-1, 1]; with `region` =
    (top, left, height, width) of that output, only that window (3, height, width). Pillow resizes only the
    source box under the window (its filter still reads the pixels around the box), so a 64-px window of a
    2048-px crop costs the window, not a full resize."""
    H, W = size
    top, left, height, width = region or (0, 0, H, W)
    sx, sy = image.width / W, image.height / H
    box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
    return to_tensor(image.resize((width, height), Image.BICUBIC, box=box))


def photo_pairs(images: Sequence[Image.Image], vae: FrozenVAE, crops_per_image: int, input_size: int,
                hr_size: int, seed: int = 0, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (N, 4, input/8, input/8) of square random crops resized to input_size, and the same crops
    at hr_size (N, 3, hr, hr) in [-1, 1]."""
    rng = random.Random(seed)
    inputs, targets = [], []
    for image in images:
        for _ in range(crops_per_image):
            box = random_crop_box(*image.size, rng, min_side=min(hr_size, *image.size))
            crop = image.crop(box)
            inputs.append(to_tensor(crop.resize((input_size, input_size), Image.BICUBIC)))
            targets.append(to_tensor(crop.resize((hr_size, hr_size), Image.BICUBIC)))
    inputs = torch.stack(inputs)
    latents = torch.cat([vae.encode(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
    return latents, torch.stack(targets)


def random_target_size(rng: random.Random, sizes: tuple[int, int], multiple: int = 8,
                       aspect_range: tuple[float, float] = (1.0, 1.0)) -> tuple[int, int]:
    """(H, W): the long side uniform in `sizes` (inclusive), aspect W/H in aspect_range, multiples of `multiple`."""
    long_side = rng.randint(sizes[0] // multiple, sizes[1] // multiple) * multiple
    return output_size(rng.uniform(*aspect_range), long_side, multiple)


def targets_at(hr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """High-resolution targets resized (antialiased) to one training size."""
    return resize(hr, size, mode="bicubic")
