"""Image grids for logging: rows of images of different sizes, each cell labelled."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageDraw

from .images import to_pil

LABEL_HEIGHT = 14


def image_grid(rows: Sequence[Sequence[torch.Tensor]], labels: Sequence[str], cell: int = 256,
               pad: int = 4) -> Image.Image:
    """rows[i][j]: an image (3, H, W) in [-1, 1]; each is fitted into a `cell`×`cell` box (aspect kept) under
    the column label labels[j]."""
    n_cols = max(len(r) for r in rows)
    width = n_cols * (cell + pad) + pad
    height = len(rows) * (cell + LABEL_HEIGHT + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        top = pad + i * (cell + LABEL_HEIGHT + pad)
        for j, image in enumerate(row):
            left = pad + j * (cell + pad)
            draw.text((left, top), labels[j] if j < len(labels) else "", fill=(0, 0, 0))
            pil = to_pil(image)
            pil.thumbnail((cell, cell), Image.LANCZOS)
            grid.paste(pil, (left, top + LABEL_HEIGHT))
    return grid
