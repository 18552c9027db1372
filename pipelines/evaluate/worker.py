"""The evaluation's actor (EvalWorker) and the readers of its work units. Not Ray Data's map_batches: the
statistics are per-actor state (D×D sums, 32 MB each at D=2048) that must be read once at the end, which
map_batches has no hook for."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import pyarrow.fs as pafs
import torch
from PIL import Image

from infgen.distribution_metrics import FeatureSample, InceptionFeatures, RandomConvFeatures, RunningStats
from infgen.evaluation import REFERENCE, Chunk, Decoders, EvalAccumulator
from infgen.images import to_rgb, to_tensor
from infgen.io import load_latents
from infgen.metrics import load_lpips
from pipelines import shards
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.model import load_model

log = logging.getLogger(__name__)


def build_extractor(cfg: EvalConfig, device: torch.device):
    if cfg.extractor == "random":
        return RandomConvFeatures(device=device)
    path = cfg.inception_weights or Path(tempfile.gettempdir())  # clean-fid downloads to the temp dir
    return InceptionFeatures.from_path(path, device=device)


class EvalWorker:
    """One actor: a model, a VAE, an extractor, LPIPS, and an EvalAccumulator filled unit by unit."""

    def __init__(self, cfg: EvalConfig, reference_features: bool, lpips_ok: bool, grid_keys: list[str],
                 aspect: Optional[float]) -> None:
        self.cfg = cfg
        workers = cfg.workers
        torch.set_num_threads(int(workers.torch_threads or max(1, math.ceil(workers.cpus_per_actor))))
        self.device = torch.device("cuda" if workers.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[workers.precision]
        from infgen.vae import load_vae

        model = None
        if any(d.startswith("infgen") for d in self.cfg.decoders):
            model = load_model(self.cfg.model, self.cfg.mlflow.tracking_uri).eval().to(self.device)
        vae = load_vae(self.cfg.vae, self.cfg.vae_subfolder, device=self.device)
        self.decoders = Decoders(self.cfg.decoders, model, vae, self.cfg.tile, self.cfg.tile_above,
                                 autocast if self.device.type == "cuda" else None)
        self.latent_channels = vae.latent_channels
        lpips = None
        if lpips_ok:
            lpips = load_lpips(self.cfg.lpips_net, self.cfg.lpips_weights).to(self.device)
        self.acc = EvalAccumulator(build_extractor(self.cfg, self.device), self.cfg.patches, self.cfg.resolutions,
                                   self.cfg.pr_samples, lpips, self.cfg.feature_batch,
                                   workers.max_batch_pixels, grid_keys, self.cfg.grid.crop, reference_features,
                                   self.cfg.upsample_truth)
        self.aspect = aspect

    def process(self, unit: dict) -> int:
        """Evaluate one unit; returns the number of samples (or reference images) it held."""
        if unit["kind"] == "reference":
            keys, images = read_reference_images(unit["paths"], self.acc)
            self.acc.add_reference(keys, images, self.aspect)
            return len(keys)
        chunks = list(read_encoded_unit(unit) if unit["kind"] == "encoded" else read_latent_unit(unit))
        for chunk in chunks:
            if chunk.latents.shape[1] != self.latent_channels:
                raise ValueError(f"{unit['path']}: latents of shape {tuple(chunk.latents.shape[1:])} have "
                                 f"{chunk.latents.shape[1]} channels; the VAE {self.cfg.vae!r} takes "
                                 f"{self.latent_channels}")
            self.acc.add_chunk(replace(chunk, latents=chunk.latents.to(self.device)), self.decoders)
        return sum(len(c.keys) for c in chunks)

    def stats(self, key: tuple) -> RunningStats:
        return self.acc.stats.get(key)

    def sample(self, key: tuple) -> Optional[FeatureSample]:
        return self.acc.samples.get(key)

    def summary(self) -> dict:
        return {"counts": {k: dict(v) for k, v in self.acc.counts.items()}, "per_image": self.acc.per_image,
                "crops": self.acc.crops}


def read_encoded_unit(unit: dict) -> Iterator[Chunk]:
    """Rows of one parquet row group (only the selected keys), in chunks of `chunk_rows`."""
    fs, path = pafs.FileSystem.from_uri(unit["uri"])
    table = shards.read_row_group(fs, path, unit["row_group"], ["key", "latent", "hr"])
    keys = table.column("key").to_pylist()
    selected = set(unit["keys"])
    index = [i for i, k in enumerate(keys) if k in selected]
    latents = shards.latents(table)
    hr = table.column("hr").to_pylist()
    for start in range(0, len(index), unit["chunk_rows"]):
        part = index[start:start + unit["chunk_rows"]]
        truths = []
        for i in part:
            try:
                truths.append(to_tensor(shards.hr_image(hr[i])))
            except Exception as e:
                raise ValueError(f"{unit['path']} row {i} (key {keys[i]}): unreadable hr image ({e})") from None
        yield Chunk([keys[i] for i in part], torch.from_numpy(latents[part]), truths,
                    [unit["resolutions"][keys[i]] for i in part] if "resolutions" in unit else None)


def read_latent_unit(unit: dict) -> Iterator[Chunk]:
    """One latent file → chunks of its latents, keyed by the file's relative path (and index in a batch)."""
    latents = load_latents(unit["path"])
    name = unit["key"]
    keys = [name] if len(latents) == 1 else [f"{name}[{i}]" for i in range(len(latents))]
    for start in range(0, len(latents), unit["chunk_rows"]):
        yield Chunk(keys[start:start + unit["chunk_rows"]], latents[start:start + unit["chunk_rows"]])


def read_reference_images(paths: list[str], acc: EvalAccumulator) -> tuple[list[str], list[Image.Image]]:
    """Readable reference images; a broken file is skipped and counted (reference, 0, broken)."""
    keys, images = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(to_rgb(image))
            keys.append(os.path.basename(path))
        except Exception as e:
            log.warning("reference image %s skipped: %s", path, e)
            acc.counts[(REFERENCE, 0)]["broken"] += 1
    return keys, images
