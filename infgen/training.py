"""One training step of InfGen in plain PyTorch: generator, EMA, discriminator, optimizers, schedules.

Distributed wiring (Ray Train, DDP) lives outside infgen/: pass a DDP-wrapped model and this code works
unchanged, since it only calls model(...) and reaches the raw module through `losses.unwrap`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from .losses import InfGenLoss, unwrap
from .machine import onednn_bf16


@dataclass
class OptimConfig:
    lr: float = 1e-4
    disc_lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    warmup_steps: int = 5000
    total_steps: int = 500_000
    min_lr_ratio: float = 0.1  # cosine decay ends at lr × this
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    bf16: bool = True  # autocast to bfloat16 on CUDA, and on CPUs where oneDNN runs bf16 (AVX-512)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_bf16(device: torch.device, wanted: bool) -> bool:
    """Whether to autocast to bfloat16 on `device`: on CUDA when wanted, and on a CPU only where oneDNN runs bf16
    (infgen.machine.onednn_bf16; on a Zen 4, with AVX512-BF16, a training step was ~1.6× faster)."""
    if not wanted:
        return False
    return device.type == "cuda" or (device.type == "cpu" and onednn_bf16())


class InfGenTrainer:
    """Owns everything one step changes; `state_dict()` is a complete checkpoint of it."""

    def __init__(self, model: nn.Module, loss: InfGenLoss, config: OptimConfig) -> None:
        self.model, self.loss, self.config = model, loss, config
        self.ema = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        kwargs = dict(betas=tuple(config.betas), weight_decay=config.weight_decay)
        self.opt_g = torch.optim.AdamW(model.parameters(), lr=config.lr, **kwargs)
        self.opt_d = torch.optim.AdamW(loss.discriminator.parameters(), lr=config.disc_lr, **kwargs)
        schedule = lambda step: warmup_cosine(step, config.warmup_steps, config.total_steps, config.min_lr_ratio)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, schedule)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, schedule)
        self.step = 0

    def train_step(self, latents: torch.Tensor, targets: torch.Tensor, size: Optional[tuple[int, int]] = None,
                   region: Optional[tuple[int, int, int, int]] = None, halo: int = 0,
                   views: Optional[Sequence[tuple]] = None) -> dict[str, float]:
        """Generator step, discriminator step (after its start), EMA update.

        latents (B, C, h, w); targets (B, 3, H', W') in [-1, 1]: the whole output (size None: the targets'
        size), or, with `region` = (top, left, height, width) of an output of `size`, that window's pixels
        (see InfGen.forward for `halo`); or, with `views` = V (size, region) pairs instead, (V·B, 3, H', W'),
        view-major, each latent encoded once for its V windows.
        """
        c, device = self.config, latents.device
        self.model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16(device, c.bf16)):
            views = views or [(size or tuple(targets.shape[-2:]), region)]
            images = self.model(latents, views=views, halo=halo)
        if images.shape != targets.shape:
            raise ValueError(f"targets {tuple(targets.shape)} do not match the decoded {tuple(images.shape)}")
        last_layer = unwrap(self.model).upsampler.conv_out.weight
        g_loss, log = self.loss.generator_loss(images, targets, self.step, last_layer)
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        log["grad_norm"] = nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip).item()
        self.opt_g.step()

        d_loss, d_log = self.loss.discriminator_loss(images, targets, self.step)
        if d_loss.requires_grad:  # after disc_start; its schedule (and warm-up) counts its own steps
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            nn.utils.clip_grad_norm_(self.loss.discriminator.parameters(), c.grad_clip)
            self.opt_d.step()
            self.sched_d.step()
        log.update(d_log, lr=self.sched_g.get_last_lr()[0])
        self.sched_g.step()
        self.update_ema()
        self.step += 1
        return log

    @torch.no_grad()
    def update_ema(self) -> None:
        # warm-up of the decay (as in timm): early on the EMA follows the weights closely
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        for ema_p, p in zip(self.ema.parameters(), unwrap(self.model).parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.ema.buffers(), unwrap(self.model).buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"model": unwrap(self.model).state_dict(), "ema": self.ema.state_dict(),
                "discriminator": unwrap(self.loss.discriminator).state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        unwrap(self.loss.discriminator).load_state_dict(state["discriminator"])
        for name in ("opt_g", "opt_d", "sched_g", "sched_d"):
            getattr(self, name).load_state_dict(state[name])
        self.step = int(state["step"])
