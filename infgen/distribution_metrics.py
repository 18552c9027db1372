"""Distribution metrics of the generative evaluation (how far the features of decoded images lie from those of the
reference images): patch protocol, streaming feature statistics, FID / sFID, KID, improved precision/recall, and the
Inception feature extractor (clean-fid's TorchScript weights). Per-image reconstruction metrics: infgen/metrics.py.

Everything here is plain PyTorch / numpy (no Ray): the distributed job calls these pieces per actor and
merges the `RunningStats`.

Definitions used throughout:
  * images are float tensors (N, 3, H, W) or (3, H, W) in [-1, 1];
  * FID = Fréchet distance between Gaussians fitted (mean, unbiased covariance) to pool_3 features (2048-d);
  * sFID = the same on spatial features: the first 7 channels of Inception's `mixed_6/conv` output
    (17×17×7 = 2023-d, flattened in (h, w, c) order as in the ADM evaluator);
  * precision / recall = improved precision/recall (Kynkäänniemi et al. 2019), k = 3, on pool_3 features.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
POOL_DIM = 2048
SPATIAL_CHANNELS, SPATIAL_SIZE = 7, 17
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023


# ----------------------------------------------------------------------------------------------------------
# Patch protocol
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchProtocol:
    """How square patches are cut from an image of any size (H, W) for patch FID (FIDp).

    mode="grid" (HiFiC's FID/256):
        grid A: top-left corners (y, x) = (i·size, j·size) for all i, j ≥ 0 with y + size ≤ H and x + size ≤ W,
                i.e. floor(H/size) · floor(W/size) patches, anchored at the top-left, no overlap;
        grid B: only when H ≥ shift_min_factor·size and W ≥ shift_min_factor·size (384 px for 256² patches):
                corners (shift + i·size, shift + j·size) with the same in-bounds rule,
                i.e. floor((H-shift)/size) · floor((W-shift)/size) patches.
        Patches that would cross the border are dropped (no padding, no resizing). Order: grid A row-major,
        then grid B row-major. `count(H, W)` is the exact total.
    mode="random" (AnyResGAN-style pFID without the random scales):
        k crops per image, top-left corners drawn uniformly (inclusive) from [0, H-size] × [0, W-size] by a
        torch.Generator seeded with int(sha256(f"{seed}:{key}")[:8 bytes]) & (2**63-1). The crops depend only on
        (seed, key, H, W): a real image and the generated image with the same key and size get identical crops.
    Images with H < size or W < size give zero patches in both modes (a skip, counted by `count_skipped`).
    """

    mode: str = "grid"
    size: int = 256
    shift: int = 128
    shift_min_factor: float = 1.5
    k: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("grid", "random"):
            raise ValueError(f"PatchProtocol.mode must be 'grid' or 'random', got {self.mode!r}")
        if self.size <= 0 or self.shift <= 0 or self.k <= 0:
            raise ValueError(f"size, shift and k must be positive: {self.to_dict()}")

    def to_dict(self) -> dict:
        """Every number of the protocol, for logging next to each result."""
        return {"patch_mode": self.mode, "patch_size": self.size, "patch_shift": self.shift,
                "patch_shift_min_factor": self.shift_min_factor, "patch_k": self.k, "patch_seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> "PatchProtocol":
        return cls(mode=d["patch_mode"], size=d["patch_size"], shift=d["patch_shift"],
                   shift_min_factor=d["patch_shift_min_factor"], k=d["patch_k"], seed=d["patch_seed"])

    def skipped(self, height: int, width: int) -> bool:
        """True when the image is smaller than one patch in either direction (it yields zero patches)."""
        return height < self.size or width < self.size

    def corners(self, height: int, width: int, key: str = "") -> list[tuple[int, int]]:
        """Top-left corners (y, x) of the patches, in the order `patches` returns them."""
        if self.skipped(height, width):
            return []
        s = self.size
        if self.mode == "grid":
            out = [(y, x) for y in range(0, height - s + 1, s) for x in range(0, width - s + 1, s)]
            if height >= self.shift_min_factor * s and width >= self.shift_min_factor * s:
                out += [(y, x) for y in range(self.shift, height - s + 1, s)
                        for x in range(self.shift, width - s + 1, s)]
            return out
        g = torch.Generator().manual_seed(_key_seed(self.seed, key))
        ys = torch.randint(0, height - s + 1, (self.k,), generator=g).tolist()
        xs = torch.randint(0, width - s + 1, (self.k,), generator=g).tolist()
        return list(zip(ys, xs))

    def count(self, height: int, width: int) -> int:
        """Exact number of patches for an image of size (H, W) (grid: |A| + |B|; random: k, or 0 if skipped)."""
        if self.skipped(height, width):
            return 0
        if self.mode == "random":
            return self.k
        s = self.size
        n = (height // s) * (width // s)
        if height >= self.shift_min_factor * s and width >= self.shift_min_factor * s:
            n += ((height - self.shift) // s) * ((width - self.shift) // s)
        return n

    def patches(self, image: torch.Tensor, key: str = "") -> torch.Tensor:
        """(3, H, W) image → (N, 3, size, size) patches (N = count(H, W), possibly 0). key matters in random mode."""
        if image.ndim != 3:
            raise ValueError(f"expected one image (3, H, W), got {tuple(image.shape)}")
        s = self.size
        crops = [image[:, y:y + s, x:x + s] for y, x in self.corners(image.shape[1], image.shape[2], key)]
        return torch.stack(crops) if crops else image.new_zeros((0, image.shape[0], s, s))

    def count_skipped(self, sizes: Iterable[tuple[int, int]]) -> int:
        """Number of images, given as (H, W), that yield zero patches under this protocol."""
        return sum(self.skipped(h, w) for h, w in sizes)


def _key_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2 ** 63 - 1)


# ----------------------------------------------------------------------------------------------------------
# Streaming statistics and distances
# ----------------------------------------------------------------------------------------------------------

class RunningStats:
    """Mean and covariance of a stream of D-dim feature vectors, from float64 running sums.

    n = number of vectors, s = Σx (D,), ss = Σxxᵀ (D, D). mean = s/n;
    cov = (ss - n·mean·meanᵀ) / (n - 1), the unbiased estimate (equal to np.cov(X, rowvar=False)).
    Stats of disjoint parts combine exactly with `merge` (sums add), so per-actor stats can be reduced.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.n = 0
        self.s = np.zeros(dim, np.float64)
        self.ss = np.zeros((dim, dim), np.float64)

    def update(self, features: Union[np.ndarray, torch.Tensor]) -> "RunningStats":
        """Add a batch of features (N, D)."""
        x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        x = x.astype(np.float64, copy=False)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features (N, {self.dim}), got {x.shape}")
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.ss += x.T @ x
        return self

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Add another RunningStats (of disjoint data) into this one; returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dim {other.dim} into dim {self.dim}")
        self.n += other.n
        self.s = self.s + other.s  # new arrays: stats fetched from Ray actors are read-only views
        self.ss = self.ss + other.ss
        return self

    @property
    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("mean of an empty RunningStats")
        return self.s / self.n

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"covariance needs at least 2 samples, have {self.n}")
        mu = self.mean
        cov = (self.ss - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.T) / 2

    def to_npz(self, path: Union[str, Path, BinaryIO]) -> Union[Path, BinaryIO]:
        """Save n, sums and dim (e.g. to cache reference statistics) at the exact path, or into an open binary
        file (a buffer to upload to an object store); returns where it went."""
        if not isinstance(path, (str, Path)):
            np.savez(path, n=self.n, s=self.s, ss=self.ss, dim=self.dim)
            return path
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            self.to_npz(f)
        return path

    @classmethod
    def from_npz(cls, path: Union[str, Path, BinaryIO]) -> "RunningStats":
        """What to_npz wrote, from a path or an open binary file."""
        with np.load(path) as z:
            stats = cls(int(z["dim"]))
            stats.n, stats.s, stats.ss = int(z["n"]), z["s"].astype(np.float64), z["ss"].astype(np.float64)
        return stats


class FeatureSample:
    """A bounded, deterministic sample of feature vectors for precision/recall and KID, which need the vectors
    themselves: the `capacity` vectors with the smallest priorities are kept.

    A vector's priority comes from `patch_priority(seed, key, index)`: it depends only on the image key and the
    patch's index, so a real patch and the generated patch at the same place are kept or dropped together, and
    the result does not depend on how the data was split across workers (samples merge exactly).
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"FeatureSample capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.priorities = np.zeros(0, np.uint64)
        self.features: Optional[np.ndarray] = None

    def add(self, features: np.ndarray, priorities: np.ndarray) -> "FeatureSample":
        features = np.asarray(features, np.float32)
        if len(features) != len(priorities):
            raise ValueError(f"{len(features)} features but {len(priorities)} priorities")
        if len(features) == 0:
            return self
        merged = features if self.features is None else np.concatenate([self.features, features])
        order = np.argsort(np.concatenate([self.priorities, np.asarray(priorities, np.uint64)]), kind="stable")
        keep = order[:self.capacity]
        self.priorities = np.concatenate([self.priorities, np.asarray(priorities, np.uint64)])[keep]
        self.features = merged[keep]
        return self

    def merge(self, other: "FeatureSample") -> "FeatureSample":
        if other.features is not None:
            self.add(other.features, other.priorities)
        return self

    def __len__(self) -> int:
        return 0 if self.features is None else len(self.features)


def patch_priority(seed: int, key: str, count: int) -> np.ndarray:
    """Priorities (uint64) of the patches 0..count-1 of the image `key`, for FeatureSample."""
    return np.array([_key_seed(seed, f"{key}#{i}") for i in range(count)], np.uint64)


def kernel_inception_distance(real_feats: np.ndarray, fake_feats: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> float:
    """KID (Bińkowski et al.): clean-fid's `kernel_distance` (cubic polynomial kernel, unbiased MMD² averaged
    over `subsets` random subsets of min(subset_size, n_real, n_fake) vectors), with a seeded subset draw."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    np.random.seed(seed)  # clean-fid draws its subsets from numpy's global generator
    try:
        return float(kernel_distance(np.asarray(real_feats, np.float64), np.asarray(fake_feats, np.float64),
                                     num_subsets=subsets, max_subset_size=subset_size))
    finally:
        np.random.set_state(state)


def frechet_distance(a: RunningStats, b: RunningStats) -> float:
    """||μa - μb||² + Tr(Σa + Σb - 2(ΣaΣb)^½), computed by clean-fid's `frechet_distance`."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet
    return float(cleanfid_frechet(a.mean, a.cov, b.mean, b.cov))


def _kth_nn_radii(feats: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set, the point itself excluded."""
    if feats.shape[0] <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {feats.shape[0]}")
    radii = [torch.cdist(chunk, feats).topk(k + 1, dim=1, largest=False).values[:, k]
             for chunk in feats.split(batch)]
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, ref: torch.Tensor, ref_radii: torch.Tensor, batch: int) -> float:
    """Fraction of queries inside at least one ball B(ref_i, ref_radii_i) (closed balls)."""
    inside = [(torch.cdist(chunk, ref) <= ref_radii[None]).any(1) for chunk in queries.split(batch)]
    return torch.cat(inside).float().mean().item()


def precision_recall(real_feats, fake_feats, k: int = 3, batch: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), Euclidean distances in float32.

    The real manifold is the union of balls around every real feature with radius = distance to its k-th
    nearest real neighbour (itself excluded); likewise the fake manifold.
    precision = fraction of fake features inside the real manifold;
    recall    = fraction of real features inside the fake manifold.
    Pairwise distances are computed `batch` rows at a time (memory batch × N).
    """
    real = torch.tensor(np.asarray(real_feats), dtype=torch.float32)
    fake = torch.tensor(np.asarray(fake_feats), dtype=torch.float32)
    real_radii, fake_radii = _kth_nn_radii(real, k, batch), _kth_nn_radii(fake, k, batch)
    return _coverage(fake, real, real_radii, batch), _coverage(real, fake, fake_radii, batch)


# ----------------------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------------------

class FeatureExtractor(nn.Module):
    """Common interface and preprocessing of every feature extractor (the real Inception and test stand-ins).

    Input: images (N, 3, H, W) in [-1, 1], any size. Preprocessing (shared by all subclasses):
      1. quantise to 8 bits: round((x + 1) · 127.5) clamped to [0, 255] (evaluated images are 8-bit images);
      2. resize to 299×299 with torch bicubic + antialias (close to, not bit-identical with, clean-fid's
         "clean" PIL-bicubic resize); skipped when already 299×299;
      3. normalise (x - 128) / 128, exactly as clean-fid's InceptionV3W.forward does.
    Subclasses implement `trunk(x) -> (spatial_map (N, C ≥ 7, h, w), pooled (N, D))`.
    Outputs are float32 numpy arrays:
      pool(images)    -> (N, D)            D = 2048 for Inception (pool_3)
      spatial(images) -> (N, h·w·7)        first 7 channels of the map, flattened in (h, w, c) order
                                           (17·17·7 = 2023 for Inception's mixed_6/conv)
    """

    input_size = 299

    def __init__(self, device: Union[str, torch.device] = "cpu"):
        super().__init__()
        self.device = torch.device(device)

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        x = ((images.to(self.device, torch.float32) + 1) * 127.5).round().clamp(0, 255)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic",
                              antialias=True, align_corners=False)
        return (x - 128) / 128

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """Both feature sets in one pass: {"pool": (N, D), "spatial": (N, h·w·7)}."""
        spatial_map, pooled = self.trunk(self.preprocess(images))
        spatial = spatial_map[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(images), -1)
        return {"pool": pooled.float().cpu().numpy(), "spatial": spatial.float().cpu().numpy()}

    def pool(self, images: torch.Tensor) -> np.ndarray:
        return self.features(images)["pool"]

    def spatial(self, images: torch.Tensor) -> np.ndarray:
        return self.features(images)["spatial"]


class InceptionFeatures(FeatureExtractor):
    """clean-fid's Inception V3 (the TorchScript port of TF's inception-2015-12-05, as in InceptionV3W).

    pool:    output of `layers` (…, mixed_10, pool2) viewed as (N, 2048) — exactly InceptionV3W.forward.
    spatial: `layers.mixed_6.conv` applied to the input of `layers.mixed_6`, i.e. TF's `mixed_6/conv`
             (the 1×1-conv branch of the 3rd 17×17 block, 192 channels, 17×17), first 7 channels → 2023-d,
             as in the ADM evaluator. Both come from one pass: the children of `layers` run in order and the
             mixed_6 input is tapped on the way.
    """

    def __init__(self, model: torch.jit.ScriptModule, device: Union[str, torch.device] = "cpu"):
        super().__init__(device)
        self.base = model.eval().to(self.device)
        self.layers = self.base.layers
        names = [name for name, _ in self.layers.named_children()]
        if "mixed_6" not in names or not hasattr(self.layers.mixed_6, "conv"):
            raise ValueError(f"unexpected Inception TorchScript layout: no layers.mixed_6.conv (children: {names})")

    @classmethod
    def from_path(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "InceptionFeatures":
        """Load clean-fid's TorchScript Inception from a local file, or from a directory holding
        inception-2015-12-05.pt (clean-fid's own download location convention). Never downloads."""
        path = Path(path).expanduser()
        file = path / INCEPTION_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"Inception weights not found at {file}: put clean-fid's {INCEPTION_FILE} there "
                f"(from {INCEPTION_URL}, fetched on a machine with internet) or pass its path")
        return cls(torch.jit.load(str(file), map_location=torch.device(device)), device)

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spatial = None
        for name, layer in self.layers.named_children():
            if name == "mixed_6":
                spatial = self.layers.mixed_6.conv(x)
            x = layer(x)
        return spatial, x.reshape(len(x), POOL_DIM)


class RandomConvFeatures(FeatureExtractor):
    """A fixed, randomly initialised small conv net with the FeatureExtractor interface: for offline tests only,
    never a reported metric. spatial: 32-ch map after 2 stride-2 convs, average-pooled to 17×17 (→ 2023-d);
    pool: global average of a 3rd conv, `pool_dim`-d."""

    def __init__(self, pool_dim: int = 64, seed: int = 0, device: Union[str, torch.device] = "cpu"):
        super().__init__(device)
        g = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3, 2), nn.Conv2d(16, 32, 3, 2), nn.Conv2d(32, pool_dim, 3, 2)])
        for conv in self.convs:
            nn.init.normal_(conv.weight, std=(2 / conv.weight[0].numel()) ** 0.5, generator=g)
            nn.init.zeros_(conv.bias)
        self.eval().to(self.device)

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.convs[1](F.relu(self.convs[0](x))))
        spatial = F.adaptive_avg_pool2d(h, SPATIAL_SIZE)
        return spatial, F.relu(self.convs[2](h)).mean((2, 3))


def image_stats(extractor: FeatureExtractor, batches: Iterable[torch.Tensor],
                pool: Optional[RunningStats] = None, spatial: Optional[RunningStats] = None
                ) -> tuple[RunningStats, RunningStats]:
    """Stream image batches (N, 3, H, W) through the extractor into (pool, spatial) RunningStats.

    Given stats are updated in place; missing ones are created at the first non-empty batch (so the result is
    (None, None) when no stats were given and every batch was empty)."""
    for images in batches:
        if len(images) == 0:
            continue
        feats = extractor.features(images)
        pool = pool or RunningStats(feats["pool"].shape[1])
        spatial = spatial or RunningStats(feats["spatial"].shape[1])
        pool.update(feats["pool"])
        spatial.update(feats["spatial"])
    return pool, spatial
