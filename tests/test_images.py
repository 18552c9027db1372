"""infgen.images: to_rgb, the one way every stage turns a file into training pixels (issue 13's odd images), and
output_size, the (H, W) that training and evaluation decode to at a long side and an aspect; dihedral, the
flips/rotations of the quality benchmark's training crops."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from infgen.images import BACKGROUND, UnsupportedImage, dihedral, dihedral_region, output_size, to_rgb


def reopen(image: Image.Image, fmt: str, **kwargs) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return Image.open(io.BytesIO(buffer.getvalue()))


def ramp(dtype, top) -> np.ndarray:
    return np.repeat(np.linspace(0, top, 640)[None, :], 480, axis=0).astype(dtype)


@pytest.mark.parametrize("make", [
    lambda: reopen(Image.fromarray(ramp(np.uint16, 65535)), "PNG"),       # 16-bit greyscale PNG
    lambda: reopen(Image.fromarray(ramp(np.float32, 1.0)), "TIFF"),       # float TIFF in [0, 1]
    lambda: reopen(Image.fromarray(ramp(np.float32, 4000.0)), "TIFF"),    # float TIFF of another range
    lambda: Image.fromarray(ramp(np.int32, 65535), mode="I"),             # 32-bit int holding 16-bit values
    lambda: reopen(Image.fromarray(ramp(np.uint8, 255)), "PNG"),          # plain 8-bit greyscale
], ids=["png16", "tiff_float01", "tiff_float_range", "int32", "png8"])
def test_high_bit_depths_scale_by_their_range_into_a_grey_ramp(make):
    rgb = np.asarray(to_rgb(make()))
    assert rgb.shape == (480, 640, 3)
    assert abs(rgb.mean() - 127.5) < 1.5, rgb.mean()  # a ramp: never all white or all black
    assert rgb[:, 0].max() <= 1 and rgb[:, -1].min() >= 254
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_transparency_is_composited_on_img2dataset_white_in_every_mode():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200           # red where opaque
    rgba[:4, ..., 3] = 255       # top half opaque, bottom half fully transparent
    quantized = Image.fromarray(rgba[..., :3]).quantize(2)
    # a palette PNG whose bottom half's colour is the transparent one
    palette = reopen(quantized, "PNG", transparency=quantized.getpixel((7, 7)))
    assert palette.mode == "P" and "transparency" in palette.info
    # an RGB PNG whose bottom half's colour (black) is its transparent colour (tRNS)
    keyed = reopen(Image.fromarray(np.where(rgba[..., 3:] > 0, rgba[..., :3], 0).astype(np.uint8)), "PNG",
                   transparency=(0, 0, 0))
    assert keyed.mode == "RGB" and "transparency" in keyed.info
    for image in (reopen(Image.fromarray(rgba, "RGBA"), "PNG"), Image.fromarray(rgba, "RGBA").convert("LA"),
                  palette, keyed):
        rgb = np.asarray(to_rgb(image))
        assert rgb.shape == (8, 8, 3)
        assert (rgb[-1, -1] == BACKGROUND).all(), image.mode   # transparent → white, never black
    rgb = np.asarray(to_rgb(reopen(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert tuple(rgb[0, 0]) == (200, 0, 0)


def test_cmyk_exif_orientation_and_animation():
    cmyk = reopen(Image.new("RGB", (6, 4), (255, 0, 0)).convert("CMYK"), "JPEG", quality=100)
    assert cmyk.mode == "CMYK" and to_rgb(cmyk).getpixel((0, 0))[0] > 240

    tall = Image.new("RGB", (4, 6))
    exif = tall.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    assert to_rgb(reopen(tall, "JPEG", exif=exif)).size == (6, 4)

    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    animated = Image.open(io.BytesIO(buffer.getvalue()))
    animated.seek(1)
    assert to_rgb(animated).getpixel((0, 0))[0] > 200  # the first frame, red


def test_refusals_are_named():
    nan = np.full((4, 4), np.nan, np.float32)
    with pytest.raises(UnsupportedImage, match="corrupt: F image with NaN") as e:
        to_rgb(Image.fromarray(nan))
    assert e.value.reason == "corrupt"


def test_output_size_keeps_aspect_and_multiples():
    assert output_size(1.0, 512) == (512, 512)
    assert output_size(1.5, 1024) == (680, 1024)
    assert output_size(0.75, 1024) == (1024, 768)
    assert output_size(100.0, 256) == (8, 256)  # never below one latent token
    with pytest.raises(ValueError, match="multiple of 8"):
        output_size(1.0, 500)


def test_dihedral_is_the_8_distinct_flips_and_turns_and_commutes_with_its_region():
    x = torch.arange(2 * 3 * 12 * 12).view(2, 3, 12, 12)
    images = [dihedral(x, g) for g in range(8)]
    assert len({tuple(image.flatten().tolist()) for image in images}) == 8
    assert torch.equal(dihedral(x, 1), torch.rot90(x, 1, dims=(-2, -1)))  # counter-clockwise, as Pillow's ROTATE_90
    for g in range(8):
        for region in [(0, 0, 12, 12), (2, 4, 4, 6), (8, 0, 4, 12), (0, 9, 3, 3)]:
            top, left, height, width = region
            t, l, h, w = dihedral_region(region, 12, g)
            assert torch.equal(images[g][..., top:top + height, left:left + width],
                               dihedral(x[..., t:t + h, l:l + w], g)), (g, region)
