"""Evaluation core, plain PyTorch: the decoders compared and the accumulator one evaluation worker fills.

pipelines/evaluate/ runs one `EvalAccumulator` per Ray actor over its share of the data; the driver merges the
actors' statistics and samples one at a time (pipelines/evaluate/scores.py), never whole accumulators (statistics
are float64 sums, samples are priority-bounded, so merging is exact whatever the split).

At a resolution R (the long side), each sample is decoded to (H, W) with the long side R and the aspect of
its ground truth (reconstruction) or of its latent (generation), sides multiples of 8 (images.output_size).
Per decoder and R:
  * `image_pool` stats: Inception pool_3 of the whole image (resized to 299²): FID;
  * `patch_pool` / `patch_spatial` stats of the protocol's patches: FIDp / sFIDp;
  * a `FeatureSample` of patch pool features: precision/recall (k=3) and KID on patches;
  * PSNR / SSIM / LPIPS against the ground truth at (H, W) (reconstruction only);
  * decode latency per image.
The ground truth (or the reference images) at (H, W) fills the same statistics under the source "reference".
Ground truth whose long side is under R is upsampled and counted (`truth_upsampled`), or, with
`upsample_truth=False`, that sample is left out at R and counted (`truth_skipped`): every number then compares
with real pixels (the short side follows the aspect, rounded to a multiple of 8: at most 4 px of stretch).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .distribution_metrics import FeatureExtractor, FeatureSample, PatchProtocol, RunningStats, patch_priority
from .images import center_crop, output_size, resize, to_pil, to_tensor
from .metrics import psnr, ssim
from .models import InfGen
from .upsample import iterative_decode, iterative_schedule
from .vae import FrozenVAE

DECODERS = ("infgen", "infgen_iterative", "vae_bicubic", "vae_lanczos")
REFERENCE = "reference"
FEATURES = ("image_pool", "patch_pool", "patch_spatial")


def lanczos_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL Lanczos resize of (B, 3, h, w) images in [-1, 1] to (H, W) (torch has no Lanczos); 8-bit round trip,
    as a user saving the VAE's output and resizing it would get."""
    return torch.stack([to_tensor(to_pil(image).resize((size[1], size[0]), Image.LANCZOS)) for image in images])


class Decoders:
    """The decoders an evaluation compares, by name (see DECODERS):

    infgen            InfGen at the target size in one pass (tiled above `tile_above` pixels per side);
    infgen_iterative  InfGen by 2× steps with VAE re-encoding (infgen.upsample); only where that takes ≥ 2 steps,
                      elsewhere it is the same computation as `infgen` and is not reported twice;
    vae_bicubic       the VAE decoder at its native size (8× the latent), then bicubic to the target size;
    vae_lanczos       the same, then Lanczos.
    `decode` takes the whole chunk's latents and the rows to decode: the VAE's native decode is then done once
    per chunk, shared by both baselines and every resolution (each baseline's latency includes its share).
    """

    def __init__(self, names: Sequence[str], model: Optional[InfGen], vae: FrozenVAE, tile: Optional[int],
                 tile_above: int, autocast: Optional[torch.dtype] = None) -> None:
        unknown = sorted(set(names) - set(DECODERS))
        if unknown:
            raise ValueError(f"unknown decoders {unknown}; known: {list(DECODERS)}")
        if model is None and any(n.startswith("infgen") for n in names):
            raise ValueError("the infgen decoders need a model")
        self.names, self.model, self.vae = list(names), model, vae
        self.tile, self.tile_above, self.autocast = tile, tile_above, autocast
        self._native: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None  # (latents, images, seconds)

    def applies(self, name: str, latent_hw: tuple[int, int], size: tuple[int, int]) -> bool:
        if name != "infgen_iterative":
            return True
        return len(iterative_schedule(latent_hw, self.model.config.scale, size)) > 1

    def decode(self, name: str, latents: torch.Tensor, index: Sequence[int],
               size: tuple[int, int]) -> tuple[torch.Tensor, float]:
        """Rows `index` of a chunk's latents → (images (len(index), 3, H, W) in [-1, 1] on the CPU, seconds per
        image)."""
        start = time.perf_counter()
        if name.startswith("vae_"):
            native, native_s = self.native(latents)
            native = native[index]
            images = resize(native, size, "bicubic") if name == "vae_bicubic" else lanczos_resize(native, size)
            return images, native_s + (time.perf_counter() - start) / len(index)
        latents = latents[index]
        tile = self.tile if self.tile and max(size) > self.tile_above else None
        with torch.autocast(latents.device.type, self.autocast, enabled=self.autocast is not None):
            if name == "infgen":
                images = self.model.decode(latents, size, tile=tile)
            else:
                images = iterative_decode(self.model, self.vae, latents, size, tile=tile)
        images = images.float().cpu()  # also waits for the GPU: the time below is the decode's
        return images, (time.perf_counter() - start) / len(latents)

    def native(self, latents: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The VAE's decode of a whole chunk at native size (cached while the same chunk is decoded), and its
        seconds per image."""
        if self._native is None or self._native[0] is not latents:
            start = time.perf_counter()
            images = self.vae.decode(latents).float().cpu()
            self._native = (latents, images, (time.perf_counter() - start) / len(latents))
        return self._native[1], self._native[2]


@dataclass
class Chunk:
    """Samples decoded together: same latent shape. truths: ground-truth images (3, h, w) in [-1, 1] at any
    size (reconstruction), or None (generation: the aspect comes from the latent). resolutions: per sample, the
    resolutions it is evaluated at (None: every one)."""

    keys: list[str]
    latents: torch.Tensor
    truths: Optional[list[torch.Tensor]] = None
    resolutions: Optional[list[Sequence[int]]] = None


class EvalAccumulator:
    """Everything one worker measures, in mergeable form. See the module docstring for what is measured."""

    def __init__(self, extractor: FeatureExtractor, protocol: PatchProtocol, resolutions: Sequence[int],
                 sample_capacity: int, lpips: Optional[torch.nn.Module] = None, feature_batch: int = 64,
                 max_batch_pixels: int = 2 ** 24, grid_keys: Sequence[str] = (), grid_crop: int = 256,
                 reference_features: bool = True, upsample_truth: bool = True) -> None:
        self.extractor, self.protocol, self.resolutions = extractor, protocol, list(resolutions)
        self.sample_capacity, self.lpips, self.feature_batch = sample_capacity, lpips, feature_batch
        self.max_batch_pixels, self.grid_keys, self.grid_crop = max_batch_pixels, set(grid_keys), grid_crop
        self.reference_features = reference_features  # False: reference statistics come from a cache
        self.upsample_truth = upsample_truth  # False: a truth with a long side under the resolution is skipped
        self.stats: dict[tuple[str, int, str], RunningStats] = {}
        self.samples: dict[tuple[str, int], FeatureSample] = {}
        self.counts: dict[tuple[str, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.per_image: list[dict] = []  # reconstruction metrics, one row per (key, decoder, resolution)
        self.crops: dict[tuple[str, int, str], np.ndarray] = {}  # (key, resolution, source) → uint8 HWC

    # ---- feeding ----------------------------------------------------------------------------------------

    def add_chunk(self, chunk: Chunk, decoders: Decoders) -> None:
        """Decode a chunk with every decoder at every resolution and measure it (and its ground truth)."""
        latent_hw = tuple(chunk.latents.shape[2:])
        for res in self.resolutions:
            for size, index in self._groups(chunk, res):
                keys = [chunk.keys[i] for i in index]
                truth = None
                if chunk.truths is not None:
                    truth = torch.stack([resize(chunk.truths[i][None], size)[0] for i in index])
                    upsampled = sum(max(chunk.truths[i].shape[1:]) < res for i in index)
                    self.counts[(REFERENCE, res)]["truth_upsampled"] += upsampled
                    if self.reference_features:
                        self.observe(REFERENCE, res, keys, truth)
                    else:  # reference statistics are cached: only the crops for the grid
                        for key, image in zip(keys, truth):
                            if key in self.grid_keys:
                                self.crops[(key, res, REFERENCE)] = centre_crop_uint8(image, self.grid_crop)
                for name in decoders.names:
                    if not decoders.applies(name, latent_hw, size):
                        continue
                    images, seconds = decoders.decode(name, chunk.latents, index, size)
                    self.counts[(name, res)]["decode_s"] += seconds * len(index)
                    self.observe(name, res, keys, images, truth)

    def add_reference(self, keys: Sequence[str], images: Sequence[Image.Image], aspect: float) -> None:
        """Real reference images (generation mode): centre-cropped to `aspect`, resized (Lanczos) to each
        resolution's (H, W), measured under the source "reference"."""
        for res in self.resolutions:
            size = output_size(aspect, res)
            kept, tensors = [], []
            for key, image in zip(keys, images):
                crop = center_crop(image, aspect)
                if not self.upsample_truth and max(crop.size) < res:
                    self.counts[(REFERENCE, res)]["truth_skipped"] += 1
                    continue
                self.counts[(REFERENCE, res)]["truth_upsampled"] += max(crop.size) < res
                kept.append(key)
                tensors.append(to_tensor(crop.resize((size[1], size[0]), Image.LANCZOS)))
            batch = self._batch(size)
            for start in range(0, len(tensors), batch):
                self.observe(REFERENCE, res, kept[start:start + batch], torch.stack(tensors[start:start + batch]))

    def observe(self, source: str, res: int, keys: Sequence[str], images: torch.Tensor,
                truth: Optional[torch.Tensor] = None) -> None:
        """Measure images (B, 3, H, W) of `source` at resolution `res` (and against `truth`, when given)."""
        counts = self.counts[(source, res)]
        counts["images"] += len(images)
        self._update("image_pool", source, res, self.extractor.pool(images))
        for key, image in zip(keys, images):
            patches = self.protocol.patches(image, key)
            if len(patches) == 0:
                counts["skipped_small"] += 1
                continue
            counts["patches"] += len(patches)
            pool = []
            for batch in patches.split(self.feature_batch):
                feats = self.extractor.features(batch)
                pool.append(feats["pool"])
                self._update("patch_pool", source, res, feats["pool"])
                self._update("patch_spatial", source, res, feats["spatial"])
            sample = self.samples.setdefault((source, res), FeatureSample(self.sample_capacity))
            sample.add(np.concatenate(pool), patch_priority(self.protocol.seed, f"{res}:{key}", len(patches)))
            if key in self.grid_keys:
                self.crops[(key, res, source)] = centre_crop_uint8(image, self.grid_crop)
        if truth is not None:
            self._reconstruction(source, res, keys, images, truth)

    # ---- merging ----------------------------------------------------------------------------------------

    def merge(self, other: "EvalAccumulator") -> "EvalAccumulator":
        """Add `other`'s measurements into this one, in one process (the Ray driver merges statistic by
        statistic instead, to hold few in memory at once); returns self."""
        for key, stats in other.stats.items():
            self.stats[key] = self.stats[key].merge(stats) if key in self.stats else stats
        for key, sample in other.samples.items():
            self.samples[key] = self.samples[key].merge(sample) if key in self.samples else sample
        add_counts(self.counts, other.counts)
        self.per_image += other.per_image
        self.crops.update(other.crops)
        return self

    # ---- internals --------------------------------------------------------------------------------------

    def _groups(self, chunk: Chunk, res: int) -> list[tuple[tuple[int, int], list[int]]]:
        """Sample indices grouped by output size at `res`, each group split to stay under max_batch_pixels.
        Without `upsample_truth`, samples whose ground truth's long side is under `res` are left out and
        counted (reference, res) `truth_skipped`."""
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        h, w = chunk.latents.shape[2:]
        for i in range(len(chunk.keys)):
            if chunk.resolutions is not None and res not in chunk.resolutions[i]:
                continue
            aspect = w / h if chunk.truths is None else chunk.truths[i].shape[2] / chunk.truths[i].shape[1]
            if chunk.truths is not None and not self.upsample_truth and max(chunk.truths[i].shape[1:]) < res:
                self.counts[(REFERENCE, res)]["truth_skipped"] += 1
                continue
            by_size[output_size(aspect, res)].append(i)
        return [(size, index[start:start + self._batch(size)])
                for size, index in by_size.items() for start in range(0, len(index), self._batch(size))]

    def _batch(self, size: tuple[int, int]) -> int:
        return max(1, self.max_batch_pixels // (size[0] * size[1]))

    def _update(self, feature: str, source: str, res: int, values: np.ndarray) -> None:
        key = (source, res, feature)
        if key not in self.stats:
            self.stats[key] = RunningStats(values.shape[1])
        self.stats[key].update(values)

    def _reconstruction(self, source: str, res: int, keys: Sequence[str], images: torch.Tensor,
                        truth: torch.Tensor) -> None:
        p, s = psnr(images, truth).tolist(), ssim(images, truth).tolist()
        lp = [None] * len(images)
        if self.lpips is not None:
            device = next(self.lpips.parameters()).device
            with torch.no_grad():
                lp = self.lpips(images.to(device), truth.to(device)).flatten().tolist()
        for key, p_i, s_i, l_i in zip(keys, p, s, lp):
            self.per_image.append({"key": key, "decoder": source, "resolution": res, "height": images.shape[2],
                                   "width": images.shape[3], "psnr": p_i, "ssim": s_i, "lpips": l_i})


def add_counts(total: dict, counts: dict) -> dict:
    """Add counters {(source, resolution): {name: value}} into `total` (the merge of workers' counts)."""
    for key, values in counts.items():
        bucket = total.setdefault(key, {})
        for name, value in values.items():
            bucket[name] = bucket.get(name, 0) + value
    return total


def centre_crop_uint8(image: torch.Tensor, size: int) -> np.ndarray:
    """The centred size×size crop (or the whole image if smaller) of (3, H, W) in [-1, 1], as uint8 HWC."""
    _, h, w = image.shape
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    crop = image[:, top:top + size, left:left + size]
    return ((crop.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()

