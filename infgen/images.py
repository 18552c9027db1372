"""Image ↔ tensor helpers (whole images and random square regions of them), and real photos that installed
packages ship (no download needed)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# (module, file) of colour photos shipped by scikit-image, scikit-learn and matplotlib
SHIPPED_PHOTOS = {
    "astronaut": ("skimage", "astronaut.png"),
    "chelsea": ("skimage", "chelsea.png"),
    "coffee": ("skimage", "coffee.png"),
    "rocket": ("skimage", "rocket.jpg"),
    "motorcycle": ("skimage", "motorcycle_left.png"),
    "hubble": ("skimage", "hubble_deep_field.jpg"),
    "retina": ("skimage", "retina.jpg"),
    "ihc": ("skimage", "ihc.png"),
    "china": ("sklearn", "china.jpg"),
    "flower": ("sklearn", "flower.jpg"),
    "grace_hopper": ("matplotlib", "grace_hopper.jpg"),
}


def shipped_photo_path(name: str) -> Path:
    if name not in SHIPPED_PHOTOS:
        raise ValueError(f"unknown photo {name!r}; choose from {sorted(SHIPPED_PHOTOS)}")
    package, filename = SHIPPED_PHOTOS[name]
    if package == "skimage":
        import skimage.data
        return Path(skimage.data.data_dir) / filename
    if package == "sklearn":
        import sklearn.datasets
        return Path(sklearn.datasets.__file__).parent / "images" / filename
    import matplotlib
    return Path(matplotlib.get_data_path()) / "sample_data" / filename


def shipped_photos(names: Union[list[str], None] = None) -> dict[str, Image.Image]:
    """Real RGB photos by name (all of them by default)."""
    return {n: to_rgb(Image.open(shipped_photo_path(n))) for n in (names or SHIPPED_PHOTOS)}


# img2dataset composites transparent pixels on white (its resizer's alpha matting); every stage here does
# the same, so a file gives the same training pixels whichever stage decodes it
BACKGROUND = (255, 255, 255)


class UnsupportedImage(ValueError):
    """An image `to_rgb` refuses; `reason` is the name it is counted under (e.g. "unsupported_mode")."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """Any opened Pillow image → the 8-bit RGB image every stage trains and evaluates on (one way, everywhere).

    - EXIF orientation applied; an animated image gives its first frame.
    - Alpha (LA, RGBA, PA, P or L/RGB with a transparent colour) composited on BACKGROUND (white, as img2dataset).
    - High bit depths scaled by their real range: I;16* by 65535 → 255; I (32-bit int) by 65535 when all values
      are in 0..65535 (16-bit PNGs open as I), else by its own min..max; F (float) by 1 when all values are in
      [0, 1], else by its own min..max.
    - 1, L, CMYK, YCbCr, LAB, HSV, RGB: Pillow's own conversion.
    Raises UnsupportedImage("unsupported_mode") for other modes and ("corrupt") for non-finite float pixels.
    """
    from PIL import ImageOps

    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise UnsupportedImage("corrupt", f"{mode} image with NaN or infinite pixels")
        lo, hi = float(values.min()), float(values.max())
        if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
            values = values / 65535
        elif not (mode == "F" and lo >= 0 and hi <= 1):
            values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        return Image.fromarray(np.round(values * 255).astype(np.uint8)).convert("RGB")
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    raise UnsupportedImage("unsupported_mode", f"Pillow mode {mode!r}")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] → PIL RGB (rounded to 8 bits)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one image of shape (3, H, W), got {tuple(image.shape)}")
    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


IMAGE_FORMATS = ("png", "webp")


def encode_image(image: torch.Tensor, fmt: str = "png") -> bytes:
    """(3, H, W) in [-1, 1] → PNG (lossless) or WebP (quality 95) file bytes."""
    import io

    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {fmt!r}")
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format=fmt.upper(), **({"quality": 95} if fmt == "webp" else {}))
    return buffer.getvalue()


def decoded_name(stem: str, index: int | None, size: tuple[int, int], fmt: str) -> str:
    """The file name of one decoded latent: `<stem>[_<index in its file>]_<W>x<H>.<fmt>`."""
    return f"{stem}{'' if index is None else f'_{index}'}_{size[1]}x{size[0]}.{fmt}"


def decode_in_batches(decode, latents: torch.Tensor, sizes, batch_size: int):
    """Every latent of a file at every size, `batch_size` latents per `decode(latents, size)` call → yields
    (size, index in the file or None when the file holds one latent, image (3, H, W)): what decoded_name takes."""
    for size in sizes:
        for start in range(0, len(latents), batch_size):
            for j, image in enumerate(decode(latents[start:start + batch_size], size)):
                yield size, start + j if len(latents) > 1 else None, image


def center_crop(image: Image.Image, aspect: float = 1.0) -> Image.Image:
    """The largest centred crop with width/height = aspect."""
    w, h = image.size
    cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def random_region(width: int, height: int, rng: random.Random, min_side: int,
                  max_side: Optional[int] = None) -> tuple[int, int, int, int]:
    """A random square (left, top, right, bottom) whose side is log-uniform in [min_side, min(max_side, short
    side)]: every scale from a close-up to the whole short side is as likely per octave. Raises ValueError when
    the image is smaller than min_side."""
    short = min(width, height, max_side or width)
    if short < min_side:
        raise ValueError(f"image {width}×{height} is too small for a {min_side}-pixel region")
    side = min(short, round(math.exp(rng.uniform(math.log(min_side), math.log(short)))))
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    return left, top, left + side, top + side


def region_image(image: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    """The region `box` (left, top, right, bottom, px) of `image` resized (Lanczos, antialiased) to size×size.
    Pillow resizes only the box (reducing by whole factors first when shrinking more than 2×), so a crop of a
    24 MP photo costs milliseconds."""
    return image.resize((size, size), Image.LANCZOS, box=box, reducing_gap=2.0)


def region_at(image: Image.Image, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """`region_image` as (3, size, size) in [-1, 1]."""
    return to_tensor(region_image(image, box, size))


def dihedral(x: torch.Tensor, g: int) -> torch.Tensor:
    """One of the 8 flips/rotations of square images (..., n, n): g = 0..7 (bit 2: mirror, bits 0-1: quarter
    turns counter-clockwise). Exact on the pixel grid, so it commutes with cropping (`dihedral_region`)
    and with resizing; the training-time augmentation of benchmarks/quality.py."""
    return torch.rot90(x.flip(-1) if g & 4 else x, g & 3, dims=(-2, -1)).contiguous()


def dihedral_region(region: tuple[int, int, int, int], side: int, g: int) -> tuple[int, int, int, int]:
    """The window (top, left, height, width) of a side×side image that flip/rotation g moves onto `region`:
    dihedral(image, g)[region] == dihedral(image[dihedral_region(region, side, g)], g)."""
    top, left, height, width = region
    for _ in range(g & 3):  # undo one counter-clockwise quarter turn
        top, left, height, width = left, side - top - height, width, height
    if g & 4:
        left = side - left - width
    return top, left, height, width


def output_size(aspect: float, long_side: int, multiple: int = 8) -> tuple[int, int]:
    """(H, W) with max(H, W) = long_side and W/H ≈ aspect, the short side rounded to a multiple of `multiple`
    (never under one multiple). Raises ValueError when long_side is not a multiple."""
    if long_side % multiple:
        raise ValueError(f"resolution {long_side} is not a multiple of {multiple}")
    short = max(multiple, round(long_side / max(aspect, 1 / aspect) / multiple) * multiple)
    return (short, long_side) if aspect >= 1 else (long_side, short)


def resize(images: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Antialiased resize of (B, 3, H, W) images in [-1, 1] to size (H, W)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    antialias = mode in ("bilinear", "bicubic")
    return F.interpolate(images, size=size, mode=mode, antialias=antialias,
                         align_corners=False if antialias else None).clamp(-1, 1)
