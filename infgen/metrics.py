"""Reconstruction metrics (PSNR, SSIM, LPIPS) on images in [-1, 1], and the LPIPS loader shared with the loss."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


class LPIPSUnavailable(RuntimeError):
    """The pretrained LPIPS backbone cannot be loaded here (offline and no local weights)."""


def load_lpips(net: str = "alex", backbone_weights: Optional[Union[str, Path]] = None,
               random_backbone: bool = False) -> nn.Module:
    """lpips.LPIPS with its shipped linear layers and a pretrained backbone.

    backbone_weights: a torchvision state dict of the backbone (e.g. alexnet-owt-7be5be79.pth); without it
    torchvision's own cache/download is used. random_backbone=True builds a randomly initialised backbone
    instead: only for offline tests, never a metric, and it is logged as such.
    """
    import torchvision

    if random_backbone:
        msg = (f"LPIPS with a RANDOM {net} backbone: the perceptual term is not LPIPS, "
               "only for offline tests; never report it as a metric")
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
        return _lpips(net, random_backbone=True).eval().requires_grad_(False)
    if backbone_weights is None:
        try:
            return _lpips(net, random_backbone=False).eval().requires_grad_(False)
        except Exception as e:  # torchvision's download: URLError, OSError, ... depending on the platform
            raise LPIPSUnavailable(
                f"LPIPS needs pretrained {net} backbone weights and torchvision could not get them ({e}). "
                f"Set the backbone weights path (a torchvision {net} state dict) or, for offline tests only, "
                f"the random-backbone option.") from None
    path = Path(backbone_weights)
    if not path.is_file():
        raise LPIPSUnavailable(f"LPIPS backbone weights {path}: no such file")
    model = _lpips(net, random_backbone=True)
    backbone = {"alex": torchvision.models.alexnet, "vgg": torchvision.models.vgg16,
                "squeeze": torchvision.models.squeezenet1_1}[net]()
    try:
        backbone.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        raise ValueError(f"{path}: not a torchvision {net} state dict ({e})") from None
    # lpips slices torchvision's `features` keeping each layer's index as its name
    state = {f"{slice_name}.{index}.{param}": value
             for slice_name, block in model.net.named_children()
             for index, _ in block.named_children()
             for param, value in backbone.features[int(index)].state_dict().items()}
    model.net.load_state_dict(state)
    return model.eval().requires_grad_(False)


def _lpips(net: str, random_backbone: bool) -> nn.Module:
    """lpips.LPIPS, without the deprecation warnings torchvision gives for how lpips (0.1.4) builds its backbone
    (`pretrained=`): they would repeat in every training worker's log and are not the user's to act on."""
    import lpips

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum", category=UserWarning)
        return lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False)


def psnr(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (data range 2), shape (B,)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(images.float(), targets.float(), data_range=2.0,
                                   reduction="none", dim=(1, 2, 3))


def ssim(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, σ 1.5, as Wang et al.) of images in [-1, 1], shape (B,)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(images.float(), targets.float(), data_range=2.0,
                                               reduction="none")
