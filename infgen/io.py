"""Reading latents from files (.pt, .npy, .safetensors) with errors that name the file."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
import torch

LATENT_SUFFIXES = (".pt", ".pth", ".npy", ".safetensors")


def load_latents(path: Union[str, Path], key: str = "latents") -> torch.Tensor:
    """Latents from a file as float32 (B, C, h, w); a single (C, h, w) latent gets a batch axis.

    .pt/.pth: a tensor, or a dict holding `key` (or exactly one tensor). .npy: an array.
    .safetensors: the tensor named `key`, or the only tensor in the file. ValueError naming the file otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such latent file")
    check_suffix(path)
    return read_latents(path.read_bytes(), str(path), key)


def check_suffix(name: str | Path) -> str:
    """The latent format of a file name (lower-case suffix); ValueError for any other."""
    suffix = Path(name).suffix.lower()
    if suffix not in LATENT_SUFFIXES:
        raise ValueError(f"{name}: unsupported latent format {suffix!r}; use one of {LATENT_SUFFIXES}")
    return suffix


def read_latents(data: bytes, name: str, key: str = "latents") -> torch.Tensor:
    """The bytes of a latent file named `name` (its suffix gives the format; see load_latents) → float32
    (B, C, h, w). Used where files come from object stores (the decode job)."""
    suffix = check_suffix(name)
    try:
        if suffix in (".pt", ".pth"):
            value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            value = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
        else:
            from safetensors.torch import load
            value = load(data)
    except Exception as e:
        raise ValueError(f"{name}: could not read a {suffix} latent ({type(e).__name__}: {e})") from None
    if isinstance(value, dict):
        tensors = {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}
        if key in tensors:
            value = tensors[key]
        elif len(tensors) == 1:
            value = next(iter(tensors.values()))
        else:
            raise ValueError(f"{name}: holds tensors {sorted(tensors)}; expected one named {key!r}")
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: holds a {type(value).__name__}, not a tensor")
    if value.ndim == 3:
        value = value[None]
    if value.ndim != 4:
        raise ValueError(f"{name}: latent has shape {tuple(value.shape)}; expected (C, h, w) or (B, C, h, w)")
    if not value.is_floating_point():
        raise ValueError(f"{name}: latent has dtype {value.dtype}; expected floating point")
    return value.float()


def find_latent_files(inputs: list[Union[str, Path]]) -> list[Path]:
    """Files and directories (searched recursively for LATENT_SUFFIXES) → sorted latent files; ValueError
    naming an input that does not exist or a directory without any."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in LATENT_SUFFIXES)
            if not found:
                raise ValueError(f"{item}: no latent files ({', '.join(LATENT_SUFFIXES)}) in this directory")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise ValueError(f"{item}: no such latent file or directory")
    return files
