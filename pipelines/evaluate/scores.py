"""The table's numbers: the actors' statistics merged one at a time into one row per decoder and resolution (FID,
FIDp, sFIDp, KIDp, precision/recall on patches; mean PSNR, SSIM, LPIPS; latency), and what each number is."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyarrow.fs as pafs

from infgen.distribution_metrics import FeatureSample, frechet_distance, kernel_inception_distance, precision_recall
from infgen.evaluation import FEATURES, REFERENCE, add_counts
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.reference_cache import load_reference, save_reference

METRICS = ("fid", "fidp", "sfidp", "kidp", "precisionp", "recallp", "psnr", "psnr_gain", "psnr_gain_se", "ssim",
           "lpips", "latency_s")
BASELINE = "vae_bicubic"  # what infgen replaces: the gain columns compare every other decoder with it

DEFINITIONS = {
    "fid": "Fréchet distance of Inception pool_3 (2048-d) of whole images (resized to 299²) vs the reference",
    "fidp": "the same on the patches of the protocol (patch_* params), real and decoded cut identically",
    "sfidp": "Fréchet distance of spatial features: first 7 channels of mixed_6/conv (17×17×7 = 2023-d) of patches",
    "kidp": "KID (clean-fid kernel_distance, cubic kernel) on patch pool_3 features of the priority sample",
    "precisionp": "improved precision (k=pr_k) of decoded patches against the reference patches",
    "recallp": "improved recall (k=pr_k) of the reference patches against the decoded patches",
    "psnr": "mean per-image PSNR (dB) against the ground truth at the same size (reconstruction only)",
    "psnr_gain": f"mean per-image PSNR minus {BASELINE}'s on the same images (dB, paired): > 0 is ahead of it",
    "psnr_gain_se": "standard error of psnr_gain (std of the per-image differences / sqrt(images)): a gain within "
                    "about 2 of these of 0 is not resolved by this many images",
    "ssim": "mean per-image SSIM (torchmetrics, Gaussian 11, σ 1.5)",
    "lpips": "mean per-image LPIPS with a pretrained backbone (lpips_net); absent when unavailable",
    "latency_s": "decode seconds per image on one worker (baselines include the VAE decode at native size)",
}


def collect(cfg: EvalConfig, actors: list, cache_fs: pafs.FileSystem, cache: dict[int, str],
            cached: bool) -> tuple[list[dict], dict]:
    """Merge the actors' statistics one at a time into the table rows (one per decoder and resolution); the
    reference statistics come from the cache entries `cache` (per resolution, on cache_fs) when `cached`, else
    from the actors, and are saved there."""
    import ray

    counts: dict[tuple, dict] = {}
    per_image, crops = [], {}
    for s in ray.get([a.summary.remote() for a in actors]):
        add_counts(counts, s["counts"])
        per_image += s["per_image"]
        crops.update(s["crops"])

    def merged(method: str, key: tuple) -> Any:
        """One statistic (`stats`) or sample (`sample`), fetched from every actor and merged."""
        parts = [x for x in ray.get([getattr(a, method).remote(key) for a in actors]) if x is not None]
        return _merge(parts)

    rows = []
    for res in cfg.resolutions:
        if cached:
            ref_stats, ref_sample, ref_counts = load_reference(cache_fs, cache[res])
        else:
            ref_stats = {f: merged("stats", (REFERENCE, res, f)) for f in FEATURES}
            ref_stats = {f: s for f, s in ref_stats.items() if s is not None}
            ref_sample = merged("sample", (REFERENCE, res))
            ref_counts = counts.get((REFERENCE, res), {})
            save_reference(cache_fs, cache[res], ref_stats, ref_sample, ref_counts)
        for decoder in cfg.decoders:
            c = counts.get((decoder, res))
            if not c:
                continue  # not applicable at this resolution (infgen_iterative within 2× of native)
            row = {"decoder": decoder, "resolution": res, "images": int(c.get("images", 0)),
                   "patches": int(c.get("patches", 0)), "skipped_small": int(c.get("skipped_small", 0)),
                   "reference_images": int(ref_counts.get("images", 0)),
                   "reference_patches": int(ref_counts.get("patches", 0)),
                   "truth_upsampled": int(ref_counts.get("truth_upsampled", 0)),
                   "truth_skipped": int(ref_counts.get("truth_skipped", 0)),
                   "latency_s": c.get("decode_s", 0.0) / max(1, c.get("images", 0))}
            row.update(distances(cfg, {f: merged("stats", (decoder, res, f)) for f in FEATURES}, ref_stats,
                                 merged("sample", (decoder, res)), ref_sample))
            row.update(reconstruction_means(per_image, decoder, res))
            row.update(psnr_gain(per_image, decoder, res))
            rows.append(row)
    return rows, {"counts": counts, "per_image": per_image, "crops": crops}


def _merge(parts: list) -> Any:
    if not parts:
        return None
    out = parts[0]
    for part in parts[1:]:
        out.merge(part)
    return out


def distances(cfg: EvalConfig, fake: dict, real: dict, fake_sample: Optional[FeatureSample],
              real_sample: Optional[FeatureSample]) -> dict:
    """FID (whole image), FIDp, sFIDp, KIDp, precision/recall on patches; None where there is too little data."""
    out = {}
    for metric, feature in (("fid", "image_pool"), ("fidp", "patch_pool"), ("sfidp", "patch_spatial")):
        a, b = real.get(feature), fake.get(feature)
        out[metric] = frechet_distance(a, b) if a is not None and b is not None and min(a.n, b.n) >= 2 else None
    enough = fake_sample is not None and real_sample is not None and min(len(fake_sample), len(real_sample)) > cfg.pr_k
    if enough:
        out["precisionp"], out["recallp"] = precision_recall(real_sample.features, fake_sample.features, k=cfg.pr_k)
        out["kidp"] = kernel_inception_distance(real_sample.features, fake_sample.features, cfg.kid_subsets,
                                                cfg.kid_subset_size, seed=cfg.patches.seed)
    else:
        out["precisionp"] = out["recallp"] = out["kidp"] = None
    return out


def reconstruction_means(per_image: list[dict], decoder: str, res: int) -> dict:
    rows = [r for r in per_image if r["decoder"] == decoder and r["resolution"] == res]
    mean = lambda name: (float(np.mean([r[name] for r in rows])) if rows and rows[0][name] is not None else None)
    return {"psnr": mean("psnr"), "ssim": mean("ssim"), "lpips": mean("lpips")}


def psnr_gain(per_image: list[dict], decoder: str, res: int) -> dict:
    """{"psnr_gain", "psnr_gain_se"} of `decoder` over BASELINE at resolution `res`: the mean and standard error
    (ddof 1) of the per-image PSNR differences on the images both scored (paired: the images' own spread, which
    is far larger than a decoder's gain, cancels). None for the baseline itself, without it, or under 2 images."""
    psnr = lambda name: {r["key"]: r["psnr"] for r in per_image
                         if r["decoder"] == name and r["resolution"] == res and r["psnr"] is not None}
    ours, base = psnr(decoder), psnr(BASELINE)
    diffs = np.array([ours[k] - base[k] for k in ours.keys() & base.keys()])
    if decoder == BASELINE or len(diffs) < 2:
        return {"psnr_gain": None, "psnr_gain_se": None}
    return {"psnr_gain": float(diffs.mean()), "psnr_gain_se": float(diffs.std(ddof=1) / len(diffs) ** 0.5)}
