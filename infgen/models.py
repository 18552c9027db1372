"""InfGen: decode a fixed-size VAE latent into an image of any requested size.

Data flow (B batch, h×w latent grid, H×W output, gy×gx = ⌈H/8⌉×⌈W/8⌉ mask-token grid, D model width):

    latent (B,4,h,w) ─ 3×3 conv ─ ResBlock(GroupNorm) × latent_res_blocks ─ + INPE ─► latent tokens (B,h,w,D)
                                                                     ─ LatentBlock × latent_depth ─┐ keys/values
    mask token + INPE(gy×gx grid) ─► queries (B,gy,gx,D) ─ QueryBlock × query_depth ────────────┴─► (B,D,gy,gx)
    ─ Upsampler (VAE-decoder-like convs, ×8) ─► (B,3,8·gy,8·gx) ─ crop ─► (B,3,H,W)

Both attentions are *local*: a token attends to the latent tokens within a fixed radius (in latent tokens)
of its own position. So the cost grows linearly with output pixels and with latent size. The latent is always
encoded whole (it is 64× smaller than the output), so its GroupNorm may use the whole image's statistics, as
the VAE decoder's mid block does; from the mask tokens on, nothing pools over the image, so every mask token's
result depends only on its position and the latent tokens: tiled decoding equals untiled decoding.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MIN_SIZE = 8  # one mask token

Size = Union[int, Sequence[int]]


# --------------------------------------------------------------------------------------------------------
# Configuration and presets
# --------------------------------------------------------------------------------------------------------


@dataclass
class InfGenConfig:
    latent_channels: int = 4
    # the latent → token projection: 3×3 (each token sees its neighbours, as the VAE decoder's conv_in does)
    # measured +0.44 dB held-out PSNR over 1×1 at equal steps (issue 10); the whole latent is encoded once,
    # so tiles stay exact
    latent_kernel: int = 3
    # conv residual blocks with GroupNorm over the whole latent before the transformer: the VAE decoder's mid
    # block. Image-level normalisation is what made the VAE decoder's structure learn (issue 10: the same
    # decoder with per-pixel or no normalisation was 1.7-2.6 dB worse on held-out photos after 500 steps,
    # and GroupNorm at the latent's resolution alone recovered it)
    latent_res_blocks: int = 2
    scaling_factor: float = 0.18215  # of the latent space (SD VAE); decode() takes latents multiplied by it
    width: int = 256
    num_heads: int = 4
    latent_depth: int = 2  # self-attention blocks over latent tokens
    query_depth: int = 4  # cross-attention blocks for mask tokens
    mlp_ratio: float = 4.0
    latent_attn_radius: float = 4.0  # in latent tokens
    cross_attn_radius: float = 2.0  # in latent tokens, around each mask token's position
    attn_block: int = 16  # queries per side of one attention block: changes speed, never results
    fourier_features: int = 128
    fourier_scale: float = 8.0  # std of the fixed Gaussian matrix B of INPE
    fourier_seed: int = 0
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32)  # one level per ×2; 4 levels = ×8
    decoder_blocks: int = 2  # residual blocks per level
    # normalisation in the upsampler's blocks: "none" (measured best, above), or "pixel" (LayerNorm over the
    # channels of each pixel: what models saved before latent_res_blocks existed use)
    upsampler_norm: str = "none"
    # mask tokens start from the latent context bilinearly interpolated at their position (else: the mask
    # token alone), so the cross-attention refines what the latent says there instead of finding it
    context_queries: bool = True
    # a linear RGB head per mask token, upsampled bilinearly ×scale and added to the upsampler's output: the
    # low frequencies come straight from the tokens, the upsampler adds detail on top
    rgb_base: bool = True
    max_size: int = 8192  # largest output side in one pass (iterative upsampling goes beyond)
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.decoder_channels = tuple(self.decoder_channels)
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if min(self.latent_attn_radius, self.cross_attn_radius) < 1:
            raise ValueError("attention radii must be >= 1 latent token so every token has a key")
        if self.latent_kernel < 1 or self.latent_kernel % 2 == 0:
            raise ValueError(f"latent_kernel must be a positive odd number, got {self.latent_kernel}")
        if len(self.decoder_channels) < 1:
            raise ValueError("decoder_channels needs at least one level")
        if self.upsampler_norm not in NORMS:
            raise ValueError(f"upsampler_norm must be one of {sorted(NORMS)}, got {self.upsampler_norm!r}")
        if self.latent_res_blocks < 0:
            raise ValueError(f"latent_res_blocks must be >= 0, got {self.latent_res_blocks}")

    @property
    def scale(self) -> int:
        """Output pixels per latent token along one side (8 for the SD VAE latent space)."""
        return 2 ** (len(self.decoder_channels) - 1)


# Model sizes, as DiT's size factories: a name and the config fields that differ from the defaults.
INFGEN_PRESETS: dict[str, dict] = {
    # trains on a CPU in minutes: the tests
    "tiny": dict(width=64, num_heads=2, latent_depth=1, query_depth=2, fourier_features=32,
                 decoder_channels=(64, 48, 32, 16), decoder_blocks=1),
    # the CPU quality benchmark (benchmarks/quality.py) and the demo: learns in tens of minutes on 2 cores; 32
    # channels at full resolution, as the VAE decoder has (16 there measured 0.12 dB worse at equal steps); no
    # latent self-attention: on 32×32 latents its 2 blocks made a step 2.9× slower, and at equal steps on 16×16
    # latents they were level with none (issue 10)
    "small": dict(width=128, num_heads=4, latent_depth=0, query_depth=2, fourier_features=64,
                  decoder_channels=(64, 64, 32, 32), decoder_blocks=1),
    "base": dict(width=384, num_heads=6, latent_depth=4, query_depth=4,
                 decoder_channels=(384, 256, 128, 64), decoder_blocks=2),
    # paper scale (the paper's exact sizes are unpublished): as wide as the SD VAE decoder at 64², then
    # narrower at high resolution, so it stays faster than the VAE decoder it replaces
    "large": dict(width=512, num_heads=8, latent_depth=6, query_depth=6,
                  decoder_channels=(512, 256, 128, 64), decoder_blocks=2),
}


# --------------------------------------------------------------------------------------------------------
# Implicit neural positional embedding (INPE)
# --------------------------------------------------------------------------------------------------------


def token_centres(n: int, stride: int, extent: int) -> torch.Tensor:
    """Normalised centres along one axis of `n` tokens of `stride` pixels in an image `extent` pixels long.

    A 64-token latent axis (stride 8, extent 512) and a 512-token axis (stride 1, extent 512) cover the same
    [0, 1]; a mask grid of ⌈H/8⌉ tokens for H pixels has its last centre past 1 when H is not a multiple of 8
    (those pixels are cropped away).
    """
    return (torch.arange(n, dtype=torch.float64) * stride + stride / 2) / extent


def sphere(uv: torch.Tensor) -> torch.Tensor:
    """Map normalised (u, v) ∈ [0, 1]² onto the unit sphere by inverse stereographic projection.

    The square is centred and scaled to [-1, 1]² and projected from the south pole. The map is smooth,
    one-to-one and conformal (a small neighbourhood keeps its shape), with no pole inside the square,
    so nearby positions stay nearby at every grid size.
    """
    xy = 2 * uv - 1
    r2 = (xy * xy).sum(-1, keepdim=True)
    return torch.cat([2 * xy, 1 - r2], dim=-1) / (1 + r2)


class INPE(nn.Module):
    """Position (u, v) → sphere → Fourier features [cos 2πBp, sin 2πBp] → MLP → a D-dim positional token.

    B is fixed (seeded, saved with the weights); only the MLP learns. The embedding is a function of the
    normalised position only, so equal positions get equal embeddings on any grid.
    """

    def __init__(self, dim: int, num_features: int, scale: float, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("B", torch.randn(num_features, 3, generator=generator) * scale)
        self.mlp = nn.Sequential(nn.Linear(2 * num_features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, uv: torch.Tensor) -> torch.Tensor:
        # float64 for the projection: at 4096² neighbouring tokens differ by ~1e-3 on the sphere
        angles = 2 * math.pi * sphere(uv.double()) @ self.B.double().T
        features = torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.B.dtype)
        return self.mlp(features)

    def grid(self, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Embeddings of the grid of rows `v` × columns `u` (normalised centres): (len(v), len(u), D)."""
        vv, uu = torch.meshgrid(v, u, indexing="ij")
        return self(torch.stack([uu, vv], dim=-1).to(self.B.device))


# --------------------------------------------------------------------------------------------------------
# Local attention
# --------------------------------------------------------------------------------------------------------


def _axis_windows(pos: torch.Tensor, n_keys: int, radius: float, block: int):
    """Split query positions along one axis into blocks and give each block one window of keys.

    pos: query positions in key units (key i sits at i). Returns key indices (n_blocks, window), the
    mask of keys within `radius` of each query (n_blocks, block, window), and the padding added.
    """
    n_blocks = math.ceil(len(pos) / block)
    pad = n_blocks * block - len(pos)
    pos = torch.cat([pos, pos[-1:].expand(pad)]).view(n_blocks, block)
    lo = torch.ceil(pos.min(dim=1).values - radius).clamp(min=0).long()
    hi = torch.floor(pos.max(dim=1).values + radius).clamp(max=n_keys - 1).long()
    window = min(int((hi - lo).max()) + 1, n_keys)
    start = lo.clamp(max=n_keys - window)
    keys = start[:, None] + torch.arange(window)
    within = (keys[:, None, :] - pos[:, :, None]).abs() <= radius
    return keys, within, pad


def interpolate_context(context: torch.Tensor, pos_y: torch.Tensor, pos_x: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of context (B, h, w, D) at rows pos_y × columns pos_x (latent token i sits at i;
    positions outside [0, h-1] take the edge token): (B, len(pos_y), len(pos_x), D). Each output reads only
    the 2×2 tokens around it, so it is as local as the attention."""
    def axis(pos: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = pos.clamp(0, n - 1)
        lo = pos.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        return lo.to(context.device), hi.to(context.device), (pos - lo).to(context.device, context.dtype)

    (y0, y1, wy), (x0, x1, wx) = axis(pos_y, context.shape[1]), axis(pos_x, context.shape[2])
    rows = torch.lerp(context[:, y0], context[:, y1], wy[None, :, None, None])
    return torch.lerp(rows[:, :, x0], rows[:, :, x1], wx[None, None, :, None])


class LocalAttention(nn.Module):
    """Multi-head attention where a query at (y, x) sees the context tokens with |i-y|, |j-x| <= radius.

    Queries are processed in blocks of `block`×`block`; each block gathers the one window of keys that
    covers all its queries and masks the keys out of each query's own radius, so the result does not
    depend on the blocking. Cost: O(queries × window²).
    """

    def __init__(self, dim: int, num_heads: int, radius: float, block: int) -> None:
        super().__init__()
        self.num_heads, self.radius, self.block = num_heads, radius, block
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pos_y: torch.Tensor, pos_x: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        """x: (B, gy, gx, D) queries at rows pos_y and columns pos_x of context (B, h, w, D)."""
        B, gy, gx, D = x.shape
        h, w = context.shape[1:3]
        H, d = self.num_heads, D // self.num_heads
        keys_y, within_y, pad_y = _axis_windows(pos_y, h, self.radius, self.block)
        keys_x, within_x, pad_x = _axis_windows(pos_x, w, self.radius, self.block)
        (nby, sy), (nbx, sx), b = keys_y.shape, keys_x.shape, self.block

        q = F.pad(self.to_q(x), (0, 0, 0, pad_x, 0, pad_y))
        q = q.view(B, nby, b, nbx, b, H, d).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, nby, nbx, H, b * b, d)
        kv = self.to_kv(context)[:, keys_y.to(x.device)[:, None, :, None], keys_x.to(x.device)[None, :, None, :]]
        kv = kv.view(B, nby, nbx, sy * sx, 2, H, d).permute(4, 0, 1, 2, 5, 3, 6)  # (2, B, nby, nbx, H, s, d)
        mask = within_y[:, None, :, None, :, None] & within_x[None, :, None, :, None, :]
        mask = mask.reshape(nby, nbx, 1, b * b, sy * sx).to(x.device)

        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
        out = out.view(B, nby, nbx, H, b, b, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, nby * b, nbx * b, D)
        return self.proj(out[:, :gy, :gx])


# --------------------------------------------------------------------------------------------------------
# Transformer blocks
# --------------------------------------------------------------------------------------------------------


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class LatentBlock(nn.Module):
    """Pre-norm local self-attention + MLP over the latent tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, radius: float, block: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = LocalAttention(dim, num_heads, radius, block)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        y = self.norm1(x)
        x = x + self.attn(y, torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), y)
        return x + self.mlp(self.norm2(x))


class QueryBlock(nn.Module):
    """Mask tokens cross-attend to the latent tokens near their position, then an MLP.

    No attention among mask tokens: each output token is computed independently, so cost is linear in
    output pixels and any tile of the output can be computed alone.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, radius: float, block: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = LocalAttention(dim, num_heads, radius, block)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, q: torch.Tensor, pos_y: torch.Tensor, pos_x: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        q = q + self.attn(self.norm1(q), pos_y, pos_x, context)
        return q + self.mlp(self.norm2(q))


# --------------------------------------------------------------------------------------------------------
# Residual conv blocks: GroupNorm ones on the whole latent, unnormalised ones in the upsampling decoder
# --------------------------------------------------------------------------------------------------------


class PixelNorm(nn.LayerNorm):
    """LayerNorm over channels at each pixel: local, as tiling needs, but it learns slowly (each pixel loses
    its magnitude); kept for models saved with upsampler_norm="pixel"."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm as in the SD VAE (32 groups where the channels allow): statistics over the whole image."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


NORMS = {"group": group_norm, "pixel": PixelNorm, "none": lambda channels: nn.Identity()}


class ResBlock(nn.Module):
    """norm → SiLU → 3×3 conv, twice, plus a skip: the VAE decoder's ResnetBlock2D with a chosen norm
    (one of NORMS)."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "pixel") -> None:
        super().__init__()
        self.norm1, self.conv1 = NORMS[norm](in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = NORMS[norm](out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Upsampler(nn.Module):
    """Mask-token features (B, D, gy, gx) → RGB (B, 3, gy·scale, gx·scale)."""

    def __init__(self, dim: int, channels: Sequence[int], blocks: int, norm: str) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(dim, channels[0], 3, padding=1)
        levels, prev = [], channels[0]
        for i, ch in enumerate(channels):
            level = nn.Sequential(*[ResBlock(prev if j == 0 else ch, ch, norm) for j in range(blocks)])
            if i < len(channels) - 1:
                level.append(Upsample(ch))
            levels.append(level)
            prev = ch
        self.levels = nn.ModuleList(levels)
        self.norm_out = NORMS[norm](prev)
        self.conv_out = nn.Conv2d(prev, 3, 3, padding=1)
        # How far (in mask tokens) an output pixel sees: each 3×3 conv reaches one pixel of its level,
        # and a pixel at level i is 1/2^i tokens. Tiles need this much context on each side.
        reach = 1 + sum(2 * blocks / 2**i + (1 / 2 ** (i + 1) if i < len(channels) - 1 else 0)
                        for i in range(len(channels))) + 1 / 2 ** (len(channels) - 1)
        self.halo = math.ceil(reach) + 1  # +1: nearest upsampling snaps to token boundaries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.levels:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


# --------------------------------------------------------------------------------------------------------
# InfGen
# --------------------------------------------------------------------------------------------------------


class InfGen(nn.Module):
    def __init__(self, config: InfGenConfig) -> None:
        super().__init__()
        self.config = c = config
        self.latent_in = nn.Conv2d(c.latent_channels, c.width, c.latent_kernel, padding=c.latent_kernel // 2)
        self.latent_res = nn.Sequential(*[ResBlock(c.width, c.width, "group") for _ in range(c.latent_res_blocks)])
        self.pos_embed = INPE(c.width, c.fourier_features, c.fourier_scale, c.fourier_seed)
        self.mask_token = nn.Parameter(torch.zeros(c.width))
        self.latent_blocks = nn.ModuleList(
            LatentBlock(c.width, c.num_heads, c.mlp_ratio, c.latent_attn_radius, c.attn_block)
            for _ in range(c.latent_depth))
        self.latent_norm = nn.LayerNorm(c.width)
        self.query_blocks = nn.ModuleList(
            QueryBlock(c.width, c.num_heads, c.mlp_ratio, c.cross_attn_radius, c.attn_block)
            for _ in range(c.query_depth))
        self.query_norm = nn.LayerNorm(c.width)
        self.upsampler = Upsampler(c.width, c.decoder_channels, c.decoder_blocks, c.upsampler_norm)
        self.rgb_head = nn.Linear(c.width, 3) if c.rgb_base else None
        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        if c.rgb_base:  # start as the smooth base image; the upsampler's detail grows from zero
            nn.init.zeros_(self.upsampler.conv_out.weight)
            nn.init.zeros_(self.upsampler.conv_out.bias)

    # ---- construction and persistence ----------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "InfGen":
        """A freshly initialised model of a named size (see INFGEN_PRESETS), with optional field overrides."""
        if name not in INFGEN_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(INFGEN_PRESETS)}")
        return cls(InfGenConfig(**{**INFGEN_PRESETS[name], **overrides}))

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write config.json and model.safetensors into `directory`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps({"model_type": "infgen", **asdict(self.config)}, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], map_location: str = "cpu",
                        revision: Optional[str] = None) -> "InfGen":
        """Load a model written by save_pretrained, from a local directory or a Hugging Face Hub repo id
        ("org/name", fetched through huggingface_hub into its cache; offline, HF_HUB_OFFLINE=1, only what is
        cached). Any mismatch between config and weights, or a repo that cannot be had, is a ValueError."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not Path(directory).exists() and _looks_like_repo_id(str(directory)):
            directory = _from_hub(str(directory), revision)
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ValueError(f"{path}: not found (an InfGen model directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
        model = cls(load_config(config_path))
        try:
            state = load_file(str(weights_path), device=map_location)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from None
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
        if missing or unexpected or wrong:
            raise ValueError(f"{weights_path} does not match {config_path}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}")
        model.load_state_dict(state)
        return model

    def push_to_hub(self, repo_id: str, private: bool = True, commit_message: str = "Upload InfGen") -> str:
        """save_pretrained into a Hugging Face Hub model repo (created if needed; huggingface_hub's login or
        HF_TOKEN); returns the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as directory:
            self.save_pretrained(directory)
            return str(api.upload_folder(repo_id=repo_id, folder_path=directory, commit_message=commit_message))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- forward ----------------------------------------------------------------------------------------

    def forward(self, latents: torch.Tensor, size: Optional[Size] = None,
                region: Optional[tuple[int, int, int, int]] = None, halo: int = 0,
                views: Optional[Sequence[tuple[Size, Optional[tuple[int, int, int, int]]]]] = None) -> torch.Tensor:
        """Training forward: scaled latents (B, C, h, w) → unclamped images (B, 3, H, W) for size (H, W).

        region: (top, left, height, width) in output pixels, multiples of `scale`: decode only that window of
        the H×W output, (B, 3, height, width) (clipped at the image's edge). halo: mask tokens of context
        decoded around the window and cut away; with `upsampler.halo` the window equals the same pixels of
        the full decode, with fewer its outer pixels see the window's edge. Training on windows makes a step
        cost the window's pixels, not the image's.

        views: instead of size and region, V (size, region) pairs decoded from one encoding of the latents:
        (V·B, 3, height, width), view-major (view v of latent b at v·B + b). Every view must give the same
        (height, width) (a ValueError otherwise). A step then costs one latent encoding per V windows.
        """
        if views is None:
            if size is None:
                raise ValueError("forward needs a size or views")
            views = [(size, region)]
        elif size is not None or region is not None:
            raise ValueError("pass size/region or views, not both")
        self.check_inputs(latents, views[0][0])  # the latents once; each view's size below
        sizes = [parse_size(view_size, self.config.max_size) for view_size, _ in views]
        context = self.encode_latents(latents)
        outs = [self._decode_view(context, size, region, halo) for size, (_, region) in zip(sizes, views)]
        if len({out.shape for out in outs}) > 1:
            raise ValueError(f"views decode to different shapes {[tuple(o.shape[-2:]) for o in outs]}: "
                             f"they are concatenated, so each must give the same (height, width)")
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _decode_view(self, context: torch.Tensor, size: tuple[int, int],
                     region: Optional[tuple[int, int, int, int]], halo: int) -> torch.Tensor:
        """The pixels of `region` (see forward) of the `size` output, unclamped, from encoded context tokens."""
        (H, W), s = size, self.config.scale
        gy, gx = -(-H // s), -(-W // s)
        if region is None:
            return self._decode_region(context, (H, W), 0, gy, 0, gx)[..., :H, :W]
        top, left, height, width = region
        if any(v % s for v in region) or height <= 0 or width <= 0 or top >= H or left >= W:
            raise ValueError(f"region {region} must be (top, left, height, width) in multiples of {s} "
                             f"pixels inside the {H}×{W} output")
        y0, x0 = top // s, left // s
        window = self._decode_window(context, (H, W), y0, min(y0 + height // s, gy), x0,
                                     min(x0 + width // s, gx), halo)
        return window[..., :H - top, :W - left]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, size: Size, tile: Optional[int] = None,
               scaled: bool = True) -> torch.Tensor:
        """Decode latents to images of `size` (an int or (H, W)) in [-1, 1].

        latents: (B, C, h, w) as a diffusion model produces them (already multiplied by the VAE's scaling
        factor; pass scaled=False for raw VAE-encoder means), any float dtype (cast to the weights'). tile:
        decode in tiles of `tile`×`tile` output pixels (a multiple of 8) with enough halo that the result equals
        the untiled decode; the memory then grows with the tile, not the output.
        """
        H, W = self.check_inputs(latents, size)
        # fp16/bf16 pipelines return half latents: compute in the weights' dtype (float32 unless cast)
        latents = latents.to(self.mask_token.dtype)
        if not scaled:
            latents = latents * self.config.scaling_factor
        s = self.config.scale
        gy, gx = -(-H // s), -(-W // s)
        context = self.encode_latents(latents)
        if tile is None:
            return self._decode_region(context, (H, W), 0, gy, 0, gx)[..., :H, :W].clamp(-1, 1)
        if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0 or tile % s:
            raise ValueError(f"tile must be a positive multiple of {s} pixels, got {tile!r}")
        t = tile // s
        out = torch.empty(latents.shape[0], 3, gy * s, gx * s, device=latents.device, dtype=context.dtype)
        for y0 in range(0, gy, t):
            for x0 in range(0, gx, t):
                y1, x1 = min(y0 + t, gy), min(x0 + t, gx)
                out[..., y0 * s:y1 * s, x0 * s:x1 * s] = self._decode_window(
                    context, (H, W), y0, y1, x0, x1, self.upsampler.halo)
        return out[..., :H, :W].clamp(-1, 1)

    def encode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) → context tokens (B, h, w, D) for the mask tokens to attend to."""
        h, w = latents.shape[2:]
        s = self.config.scale
        pos = self.pos_embed.grid(token_centres(h, s, h * s), token_centres(w, s, w * s))
        x = self.latent_res(self.latent_in(latents)).permute(0, 2, 3, 1) + pos.to(latents.dtype)
        for block in self.latent_blocks:
            x = self._run(block, x)
        return self.latent_norm(x)

    def _decode_window(self, context: torch.Tensor, size: tuple[int, int], y0: int, y1: int, x0: int, x1: int,
                       halo: int) -> torch.Tensor:
        """Pixels of mask-token rows [y0, y1) × columns [x0, x1), decoded with `halo` tokens of context around
        them (clipped at the grid's edge) that are then cut away."""
        s, gy, gx = self.config.scale, -(-size[0] // self.config.scale), -(-size[1] // self.config.scale)
        ya, xa = max(y0 - halo, 0), max(x0 - halo, 0)
        region = self._decode_region(context, size, ya, min(y1 + halo, gy), xa, min(x1 + halo, gx))
        oy, ox = (y0 - ya) * s, (x0 - xa) * s
        return region[..., oy:oy + (y1 - y0) * s, ox:ox + (x1 - x0) * s]

    def _decode_region(self, context: torch.Tensor, size: tuple[int, int],
                       y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """Pixels of mask tokens rows [y0, y1) × columns [x0, x1) of the output grid for `size`."""
        (H, W), (h, w), s = size, context.shape[1:3], self.config.scale
        v, u = token_centres(-(-H // s), s, H)[y0:y1], token_centres(-(-W // s), s, W)[x0:x1]
        pos_y, pos_x = v * h - 0.5, u * w - 0.5  # in latent tokens: latent token i sits at i
        q = self.mask_token + self.pos_embed.grid(v, u).to(context.dtype)
        q = q.expand(context.shape[0], *q.shape)
        if self.config.context_queries:
            q = q + interpolate_context(context, pos_y, pos_x)
        for block in self.query_blocks:
            q = self._run(block, q, pos_y, pos_x, context)
        features = self.query_norm(q).permute(0, 3, 1, 2)
        pixels = self.upsampler(features)
        if self.rgb_head is not None:
            base = self.rgb_head(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            pixels = pixels + F.interpolate(base, scale_factor=float(s), mode="bilinear", align_corners=False)
        return pixels

    def _run(self, block: nn.Module, *args):
        if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # ---- input checks -----------------------------------------------------------------------------------

    def check_inputs(self, latents: torch.Tensor, size: Size) -> tuple[int, int]:
        """Raise a ValueError naming the problem; return (H, W)."""
        c = self.config
        if not isinstance(latents, torch.Tensor):
            raise ValueError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if latents.ndim != 4:
            raise ValueError(f"latents must have shape (batch, {c.latent_channels}, h, w), got {tuple(latents.shape)}")
        if latents.shape[1] != c.latent_channels:
            raise ValueError(f"latents have {latents.shape[1]} channels, this model takes {c.latent_channels} "
                             f"(shape {tuple(latents.shape)})")
        if not latents.is_floating_point():
            raise ValueError(f"latents must be floating point, got {latents.dtype}")
        bad = (~torch.isfinite(latents)).sum().item()
        if bad:
            raise ValueError(f"latents contain {bad} NaN/inf values out of {latents.numel()}")
        return parse_size(size, c.max_size)


def parse_size(size: Size, max_size: int) -> tuple[int, int]:
    """An int (square) or (H, W) of integers in [MIN_SIZE, max_size] → (H, W)."""
    pair = (size, size) if not isinstance(size, (tuple, list, torch.Size)) else tuple(size)
    if len(pair) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    for side in pair:
        if isinstance(side, bool) or not isinstance(side, int):
            raise ValueError(f"size must be integers, got {size!r}")
        if side <= 0:
            raise ValueError(f"size must be positive, got {size!r}")
        if side < MIN_SIZE:
            raise ValueError(f"size {size!r} is below the minimum of {MIN_SIZE} pixels")
        if side > max_size:
            raise ValueError(f"size {size!r} is above this model's maximum of {max_size} pixels per side "
                             f"(use iterative upsampling, or raise max_size in the config)")
    return pair


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _from_hub(repo_id: str, revision: Optional[str]) -> str:
    """The local snapshot of an InfGen repo on the Hub (config + weights only)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    except Exception as e:  # offline, no such repo, no access: say which and how to get past it
        raise ValueError(f"{repo_id}: not a local directory, and the Hugging Face Hub repo could not be fetched "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); offline, pass the "
                         f"model's local directory") from None


# fields added after models were saved, with the value that reproduces those models
LEGACY_DEFAULTS = {"latent_res_blocks": 0, "upsampler_norm": "pixel"}


def load_config(path: Union[str, Path]) -> InfGenConfig:
    """The InfGenConfig a saved config.json describes (config_from_dict)."""
    return config_from_dict(json.loads(Path(path).read_text()), str(path))


def config_from_dict(raw: dict, source: str) -> InfGenConfig:
    """A saved model config (config.json's content, or a checkpoint's model_config) → InfGenConfig: fields added
    since it was saved take the value that reproduces the saved model (LEGACY_DEFAULTS). Raises ValueError naming
    `source` for fields this version does not know."""
    raw = {k: v for k, v in raw.items() if k != "model_type"}
    for key, value in LEGACY_DEFAULTS.items():  # saved before the field existed: build what was saved
        raw.setdefault(key, value)
    unknown = sorted(set(raw) - {f.name for f in fields(InfGenConfig)})
    if unknown:
        raise ValueError(f"{source}: unknown config fields {unknown}")
    return InfGenConfig(**raw)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
