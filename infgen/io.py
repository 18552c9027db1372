"""Reading latents from files (.pt, .npy, .safetensors) with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch

LATENT_SUFFIXES = (".pt", ".pth", ".npy", ".safetensors")


def load_latents(path: Union[str, Path], key: str = "latents") -> torch.Tensor:
    """Latents from a file as float32 (B, C, h, w); a single (C, h, w) latent gets a batch axis.

    .pt/.pth: a tensor, or a dict holding `key` (or exactly one tensor). .npy: an array.
    .safetensors: the tensor named `key`, or the only tensor in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such latent file")
    suffix = path.suffix.lower()
    if suffix not in LATENT_SUFFIXES:
        raise ValueError(f"{path}: unsupported latent format {suffix!r}; use one of {LATENT_SUFFIXES}")
    try:
        if suffix in (".pt", ".pth"):
            value = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            value = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            from safetensors.torch import load_file
            value = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: could not read a {suffix} latent ({type(e).__name__}: {e})") from None
    if isinstance(value, dict):
        tensors = {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}
        if key in tensors:
            value = tensors[key]
        elif len(tensors) == 1:
            value = next(iter(tensors.values()))
        else:
            raise ValueError(f"{path}: holds tensors {sorted(tensors)}; expected one named {key!r}")
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path}: holds a {type(value).__name__}, not a tensor")
    if value.ndim == 3:
        value = value[None]
    if value.ndim != 4:
        raise ValueError(f"{path}: latent has shape {tuple(value.shape)}; expected (C, h, w) or (B, C, h, w)")
    if not value.is_floating_point():
        raise ValueError(f"{path}: latent has dtype {value.dtype}; expected floating point")
    return value.float()
