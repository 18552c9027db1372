"""L1 + L2 + LPIPS + adversarial loss. One object owns the PatchGAN discriminator, its warm-up and the adaptive
weight; each call returns (loss, log dict). `unwrap` (the module inside a DDP wrapper) is here, the lowest module
that needs it: the discriminator and, in infgen.training, the generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import load_lpips


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(model, "module", model)


@dataclass
class LossConfig:
    l1_weight: float = 1.0
    # mean squared error: PSNR's own term. L1 alone settles on the median where detail is uncertain; with
    # L2 the decoder also pays for large errors (measured: +0.13 dB held-out PSNR at 400 steps, issue 10)
    l2_weight: float = 0.0
    lpips_weight: float = 0.1
    adv_weight: float = 0.1
    disc_start: int = 10_000  # steps before the discriminator trains and the adversarial term counts
    disc_loss: str = "hinge"  # hinge | non_saturating
    adaptive_weight: bool = False  # scale the adversarial term by ‖∇L_rec‖/‖∇L_adv‖ at the last layer
    disc_channels: int = 64
    disc_layers: int = 3
    lpips_net: str = "alex"
    lpips_weights: Optional[str] = None  # torchvision backbone state dict; None: torchvision's cache/download
    lpips_random_backbone: bool = False  # offline tests only: the term is then not LPIPS

    def __post_init__(self) -> None:
        if self.disc_loss not in ("hinge", "non_saturating"):
            raise ValueError(f"disc_loss must be 'hinge' or 'non_saturating', got {self.disc_loss!r}")

    def describe(self, step: int) -> str:
        """The terms that counted in the first `step` steps, weighted, e.g. "L1 + 0.1·LPIPS + 0.1·GAN (hinge, from
        step 10000)": the GAN term only once past `disc_start`."""
        weighted = [("L1", self.l1_weight), ("L2", self.l2_weight),
                    ("a perceptual term on a RANDOM backbone (offline: not LPIPS)" if self.lpips_random_backbone
                     else f"LPIPS ({self.lpips_net})", self.lpips_weight)]
        if step > self.disc_start:
            weighted.append((f"GAN ({self.disc_loss}, from step {self.disc_start})", self.adv_weight))
        return " + ".join(name if w == 1 else f"{w:g}·{name}" for name, w in weighted if w) or "no term"


class PatchDiscriminator(nn.Sequential):
    """PatchGAN (pix2pix): strided 4×4 convs, one real/fake logit per ~70-pixel patch.
    GroupNorm instead of BatchNorm, so DDP needs no synchronised statistics."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        blocks = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            blocks += [nn.Conv2d(ch, out, 4, 2 if i < layers else 1, 1, bias=False),
                       nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2, True)]
            ch = out
        blocks.append(nn.Conv2d(ch, 1, 4, 1, 1))
        super().__init__(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)


class InfGenLoss(nn.Module):
    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        self.config = config
        self.discriminator = PatchDiscriminator(config.disc_channels, config.disc_layers)
        self.lpips = (load_lpips(config.lpips_net, config.lpips_weights, config.lpips_random_backbone)
                      if config.lpips_weight > 0 else None)

    def adversarial_on(self, step: int) -> bool:
        return self.config.adv_weight > 0 and step >= self.config.disc_start

    def generator_loss(self, images: torch.Tensor, targets: torch.Tensor, step: int,
                       last_layer: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for the generator's step. last_layer: the generator's output weight (adaptive weight only)."""
        c = self.config
        images, targets = images.float(), targets.float()
        error = images - targets
        l1, l2 = error.abs().mean(), error.pow(2).mean()
        perceptual = self.lpips(images, targets).mean() if self.lpips is not None else images.new_zeros(())
        rec = c.l1_weight * l1 + c.l2_weight * l2 + c.lpips_weight * perceptual
        log = {"l1": l1.item(), "l2": l2.item(), "rec_loss": rec.item()}
        if self.lpips is not None:  # with a random backbone the term is not LPIPS: it is not logged as one
            log["perceptual_random_backbone" if c.lpips_random_backbone else "lpips"] = perceptual.item()
        if not self.adversarial_on(step):
            return rec, {**log, "loss": rec.item()}

        # the raw module, not a DDP wrapper: this forward must not join DDP's gradient sync, and the
        # discriminator's gradients come from discriminator_loss only
        discriminator = unwrap(self.discriminator)
        discriminator.requires_grad_(False)
        logits_fake = discriminator(images)
        discriminator.requires_grad_(True)
        adv = -logits_fake.mean() if c.disc_loss == "hinge" else F.softplus(-logits_fake).mean()
        weight = c.adv_weight
        if c.adaptive_weight:
            if last_layer is None:
                raise ValueError("adaptive_weight needs the generator's last layer")
            weight = weight * self.adaptive_weight(rec, adv, last_layer)
        loss = rec + weight * adv
        return loss, {**log, "g_adv": adv.item(), "adv_weight": float(weight), "loss": loss.item()}

    def discriminator_loss(self, images: torch.Tensor, targets: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for the discriminator's step (zero, with no graph, during warm-up)."""
        if not self.adversarial_on(step):
            return torch.zeros((), device=images.device), {"d_loss": 0.0}
        logits_real = self.discriminator(targets.float().detach())
        logits_fake = self.discriminator(images.float().detach())
        if self.config.disc_loss == "hinge":
            loss = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
        else:
            loss = 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
        return loss, {"d_loss": loss.item(), "logits_real": logits_real.mean().item(),
                      "logits_fake": logits_fake.mean().item()}

    @staticmethod
    def adaptive_weight(rec: torch.Tensor, adv: torch.Tensor, last_layer: torch.Tensor) -> float:
        """‖∇rec‖ / ‖∇adv‖ at the last layer (taming-transformers), clamped to [0, 1e4]."""
        rec_grad = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
        adv_grad = torch.autograd.grad(adv, last_layer, retain_graph=True)[0]
        return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).item()
