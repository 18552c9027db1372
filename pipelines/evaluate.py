"""Stage 4: evaluation across resolutions on a Ray actor pool: FID / FIDp / sFIDp / KIDp / precision-recall on
patches, PSNR / SSIM / LPIPS, decode latency; infgen against the VAE + resize baselines, in one run.

Inputs (`data_kind`):
  encoded  the encode stage's parquet shards (held-out ones): latent + high-resolution ground truth, i.e.
           reconstruction; the ground truth at each resolution is the reference for the FID family;
  latents  a directory of latents from any diffusion model (.pt / .npy / .safetensors, one or a batch per
           file) plus `reference`, a directory of real images for the FID family.

Work is split into units (a parquet row group, a latent file, a chunk of reference images) that a
`ray.util.ActorPool` of `EvalWorker`s processes; each actor loads the model, the VAE, the feature extractor and
LPIPS once (on a GPU when `workers.num_gpus` > 0) and accumulates float64 sums. Not Ray Data's map_batches: the
statistics are per-actor state (D×D sums, 32 MB each at D=2048) that must be read once at the end, which
map_batches has no hook for. The driver then merges them one statistic at a time (a few D×D matrices in
memory at once, however many patches were seen), so a million patches never sit in memory.

Reference statistics (the ground truth or the reference images at each resolution) depend only on the data,
the selection, the patch protocol, the resolution and the extractor: they are cached under that hash and reused
by the next evaluation of another model on the same data.

`data` (encoded shards), `output` and `reference_cache` are local paths or URIs (s3://, gs://, ...), read and
written through pyarrow filesystems; `model`, `reference`, latent files and `holdout.urls` are local (or mounted).

Output, under `<output>/<fingerprint>/`: results.csv / results.json (one row per decoder and resolution,
with the protocol), per_image.csv, metrics_vs_resolution.png, crops_<R>.png; all logged to one MLflow run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Optional, Sequence

import numpy as np
import pyarrow.fs as pafs
import torch
from PIL import Image

from infgen.evaluation import DECODERS, FEATURES, REFERENCE, Chunk, Decoders, EvalAccumulator, add_counts
from infgen.fid import (FeatureSample, InceptionFeatures, PatchProtocol, RandomConvFeatures, RunningStats,
                        frechet_distance, kernel_inception_distance, precision_recall)
from infgen.images import to_rgb, to_tensor
from infgen.io import LATENT_SUFFIXES, load_latents
from infgen.metrics import LPIPSUnavailable, load_lpips
from infgen.models import WEIGHTS_NAME, InfGen

from pipelines import checkpoint, shards
from pipelines.common import (StageResult, fingerprint, is_complete, mark_success, local_files, output_root,
                              output_uri, read_json, remove_dir, renames_are_atomic, resolve_files, uri, write_json)
from pipelines.config import MlflowConfig, RayConfig, dataclass_from, require
from pipelines.holdout import Holdout
from pipelines.tracking import config_hash, logged_model_id

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
METRICS = ("fid", "fidp", "sfidp", "kidp", "precisionp", "recallp", "psnr", "ssim", "lpips", "latency_s")


@dataclass
class EvalWorkers:
    """The `workers` section: the actor pool and how much each unit and batch holds."""

    num_actors: int = 1
    num_gpus: float = 0.0  # per actor
    cpus_per_actor: float = 1.0
    torch_threads: Optional[int] = None  # per actor; null: its CPUs
    precision: str = "fp32"  # fp32 | bf16 | fp16: InfGen decodes under this autocast on GPUs
    chunk_rows: int = 16  # samples per work unit (and per decode chunk)
    max_batch_pixels: int = 2 ** 24
    reference_chunk: int = 16  # reference images per work unit

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"workers.precision must be fp32, bf16 or fp16, got {self.precision!r}")


@dataclass
class GridConfig:
    """The `grid` section: centre crops side by side at each resolution."""

    count: int = 4  # samples
    crop: int = 256  # pixels per side


@dataclass
class EvalConfig:
    """An evaluation's config; conf/eval/local.yaml documents every key. Checked on construction: a ValueError
    names the key that is wrong."""

    CONFIG_NAME: ClassVar[str] = "evaluation"
    model: Optional[str]  # local exported model dir, training checkpoint dir (pipelines.checkpoint), runs:/ or models:/
    data: Optional[str] = None  # encoded parquet shards (a path or URI), or a local directory of latent files
    output: Optional[str] = None  # results under <output>/<fingerprint>/ (a path or URI)
    data_kind: str = "encoded"  # encoded (reconstruction) | latents (generation, needs `reference`)
    reference: Optional[str] = None  # data_kind=latents: real images (a directory or glob) for the FID family
    limit: Optional[int] = None  # at most this many samples at each resolution (encoded rows of the smallest key
    #   hashes whose ground truth reaches it: see `select`) or latent files
    holdout: Holdout = field(default_factory=Holdout)  # only the images training held out with the same section
    #   (pipelines.holdout.Holdout: listed URLs and/or a URL-hash fraction); neither: every row
    name: str = "eval"
    resolutions: list = field(default_factory=lambda: [512, 1024])  # long side in pixels
    upsample_truth: bool = True  # False: every number compares with real pixels: with a `limit`, each resolution
    #   selects samples whose ground truth reaches it; without, a smaller one is left out there and counted
    decoders: list = field(default_factory=lambda: list(DECODERS))
    vae: str = "tiny"  # the baselines' decoder and the iterative decoder's encoder
    vae_subfolder: Optional[str] = None
    tile: Optional[int] = 512  # infgen decodes sides above tile_above in tiles of this many pixels
    tile_above: int = 2048
    patches: PatchProtocol = field(default_factory=PatchProtocol)  # the patch protocol of FIDp and friends
    extractor: str = "inception"  # inception (clean-fid's weights) | random (offline tests only: not FID)
    inception_weights: Optional[str] = None  # inception-2015-12-05.pt or its directory; default: clean-fid's cache
    feature_batch: int = 64
    pr_k: int = 3
    pr_samples: int = 10_000  # patch features kept per decoder and resolution for precision/recall and KID
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    lpips: bool = True  # reported only with a pretrained backbone; skipped (and said so) when unavailable
    lpips_net: str = "alex"
    lpips_weights: Optional[str] = None  # a torchvision state dict of the backbone; default: torchvision's cache
    grid: GridConfig = field(default_factory=GridConfig)
    reference_cache: Optional[str] = None  # a path or URI; default <output>/reference_stats
    workers: EvalWorkers = field(default_factory=EvalWorkers)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="infgen-eval"))

    def __post_init__(self) -> None:
        require(vars(self), ("data", "output"), "evaluation")
        if self.data_kind not in ("encoded", "latents"):
            raise ValueError(f"data_kind must be 'encoded' or 'latents', got {self.data_kind!r}")
        if self.data_kind == "latents" and not self.reference:
            raise ValueError("data_kind=latents needs `reference`: a directory of real images for FID")
        unknown = sorted(set(self.decoders) - set(DECODERS))
        if unknown or not self.decoders:
            raise ValueError(f"decoders must be a non-empty subset of {list(DECODERS)}, got {self.decoders}")
        if not self.model and any(d.startswith("infgen") for d in self.decoders):
            raise ValueError(f"decoders {self.decoders} include infgen but no `model` is set")
        bad = [r for r in self.resolutions if not isinstance(r, int) or r < 64 or r % 8]
        if bad or not self.resolutions:
            raise ValueError(f"resolutions must be multiples of 8, at least 64 (long side in pixels), got {bad}")
        if self.extractor not in ("inception", "random"):
            raise ValueError(f"extractor must be 'inception' or 'random', got {self.extractor!r}")
        if self.tile is not None and self.tile % 8:
            raise ValueError(f"tile must be a multiple of 8, got {self.tile}")


# ---- the worker ---------------------------------------------------------------------------------------------


def load_model(source: str, tracking_uri: Optional[str] = None) -> InfGen:
    """An exported model directory, a training checkpoint directory (its EMA weights), an MLflow model
    directory, or an MLflow runs:/…/model or models:/name/version (or @alias) URI (downloaded first)."""
    if source.startswith(("runs:/", "models:/")):
        import mlflow

        if tracking_uri:  # the model registry follows it (download_artifacts' own tracking_uri leaves it behind)
            mlflow.set_tracking_uri(tracking_uri)
        source = mlflow.artifacts.download_artifacts(source)
    path = Path(source)
    if (path / "MLmodel").is_file():  # an MLflow model, as training logs it (infgen/pyfunc.py): its artifact
        from mlflow.models import Model

        from infgen.pyfunc import ARTIFACT

        path = path / Model.load(str(path)).flavors["python_function"]["artifacts"][ARTIFACT]["path"]
    if (path / WEIGHTS_NAME).is_file():
        return InfGen.from_pretrained(path)
    if checkpoint.is_checkpoint(path):
        return checkpoint.load_model(path)
    raise ValueError(f"model {source}: neither an exported model ({WEIGHTS_NAME}) nor a training checkpoint "
                     f"({checkpoint.STATE_FILE}), nor an MLflow runs:/ or models:/ URI")


def build_extractor(cfg: EvalConfig, device: torch.device):
    if cfg.extractor == "random":
        return RandomConvFeatures(device=device)
    path = cfg.inception_weights or Path(tempfile.gettempdir())  # clean-fid downloads to the temp dir
    return InceptionFeatures.from_path(path, device=device)


def extractor_id(cfg: EvalConfig) -> str:
    """What the features are, in results and cache keys; a test extractor can never pass for Inception."""
    if cfg.extractor == "random":
        return "random-conv (offline tests only; NOT Inception: not comparable with any published FID)"
    return "clean-fid inception-2015-12-05 (pool_3 2048-d; mixed_6/conv first 7 ch, 2023-d)"


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


# ---- planning -----------------------------------------------------------------------------------------------


@dataclass
class Plan:
    units: list[dict]
    input_files: list[str]  # for the fingerprint and the lineage
    fs: pafs.FileSystem
    samples: int
    grid_keys: list[str]
    aspect: Optional[float] = None  # data_kind=latents: W/h of the latents (reference images are cropped to it)
    reference_units: list[dict] = field(default_factory=list)
    reference_files: list[str] = field(default_factory=list)
    holdout: str = ""  # the split the selection used (Holdout.describe), for the fingerprint


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def plan(cfg: EvalConfig) -> Plan:
    chunk_rows = cfg.workers.chunk_rows
    holdout = cfg.holdout.read()  # reads the URL list once
    if cfg.data_kind == "encoded":
        return plan_encoded(cfg, chunk_rows, holdout)
    fs, paths = resolve_files(cfg.data, suffix=LATENT_SUFFIXES)
    ref_fs, ref_paths = resolve_files(cfg.reference, suffix=IMAGE_SUFFIXES)
    for spec, where in ((cfg.data, fs), (cfg.reference, ref_fs)):
        if where.type_name != "local":  # infgen.io.load_latents and PIL read paths
            raise ValueError(f"{spec}: data_kind=latents reads latent files and reference images from a local (or "
                             f"mounted) filesystem only; copy them there, or evaluate encoded shards")
    paths = paths[:cfg.limit] if cfg.limit else paths
    first = load_latents(paths[0])  # fail fast on a bad file; every worker checks its own files too
    channels = expected_latent_channels(cfg)
    if first.shape[2] * first.shape[3] == 0 or (channels and first.shape[1] != channels):
        raise ValueError(f"{paths[0]}: latents of shape {tuple(first.shape)}; expected (B, {channels or 'C'}, h, w) "
                         f"with h, w > 0 for model {cfg.model!r}")
    root = cfg.data if os.path.isdir(cfg.data) else os.path.dirname(paths[0])
    units = [{"kind": "latents", "path": p, "key": os.path.relpath(p, root), "chunk_rows": chunk_rows}
             for p in paths]
    step = cfg.workers.reference_chunk
    reference_units = [{"kind": "reference", "paths": ref_paths[i:i + step]} for i in range(0, len(ref_paths), step)]
    grid_keys = [u["key"] if len(first) == 1 else f"{u['key']}[0]" for u in units[:cfg.grid.count]]
    return Plan(units, paths, fs, len(paths), grid_keys, first.shape[3] / first.shape[2], reference_units, ref_paths,
                holdout.describe())


def expected_latent_channels(cfg: EvalConfig) -> Optional[int]:
    """The model's latent channels, when its config is readable here (a local exported model)."""
    config = Path(cfg.model or "") / "config.json"
    return json.loads(config.read_text()).get("latent_channels") if cfg.model and config.is_file() else None


def plan_encoded(cfg: EvalConfig, chunk_rows: int, holdout: Holdout) -> Plan:
    """Units of at most `chunk_rows` selected rows of one parquet row group, each row with the resolutions it is
    evaluated at (see `select`)."""
    fs, paths = resolve_files(cfg.data, suffix=".parquet")
    groups = [(path, g, rows) for path in paths  # (path, row group, [(key, hr long side)])
              for g, rows in enumerate(shards.row_group_keys(fs, path, uri(fs, path)))]
    if holdout:  # only the images training held out, by the same split
        keep = set(shards.held_out_keys(fs, paths, holdout))
        groups = [(path, g, [r for r in rows if r[0] in keep]) for path, g, rows in groups]
    ordered = sorted((key_hash(k), k, side) for _, _, rows in groups for k, side in rows)
    if not ordered:
        raise ValueError(f"data {cfg.data}: the shards hold no rows"
                         + (f" held out by holdout ({holdout.describe()})" if holdout else ""))
    selected = select([(k, side) for _, k, side in ordered], cfg.resolutions, cfg.limit, cfg.upsample_truth)
    units = []  # at most chunk_rows samples each: many small units keep every actor busy to the end
    for path, g, rows in groups:
        chosen = [k for k, _ in rows if k in selected]
        units += [{"kind": "encoded", "uri": uri(fs, path), "path": path, "row_group": g, "chunk_rows": chunk_rows,
                   "keys": chosen[i:i + chunk_rows], "resolutions": {k: selected[k] for k in chosen[i:i + chunk_rows]}}
                  for i in range(0, len(chosen), chunk_rows)]
    grid_keys = [k for _, k, _ in ordered if k in selected][:cfg.grid.count]
    return Plan(units, paths, fs, len(selected), grid_keys, holdout=holdout.describe())


def select(rows: Sequence[tuple[str, Optional[int]]], resolutions: Sequence[int], limit: Optional[int],
           upsample_truth: bool) -> dict[str, list[int]]:
    """Which rows are evaluated at which resolutions: {key: [resolution, ...]}. rows: (key, long side of the
    ground truth in px, None when unknown), in selection order (smallest key hash first: deterministic,
    independent of file order). Without a limit, every row at every resolution. With one, at each resolution
    the first `limit` rows whose ground truth reaches it (any row when `upsample_truth`, or when its size is
    unknown: the accumulator then skips and counts it), so a large resolution gets `limit` samples of real
    pixels too, not only the few of the first `limit` rows that happen to be large enough."""
    if not limit:  # every row everywhere: the accumulator skips (and counts) a truth too small for a resolution
        return {key: list(resolutions) for key, _ in rows}
    chosen: dict[str, list[int]] = {}
    for res in resolutions:
        reaching = [k for k, side in rows if upsample_truth or side is None or side >= res]
        for key in reaching[:limit]:
            chosen.setdefault(key, []).append(res)
    return chosen


# ---- reference statistics cache -----------------------------------------------------------------------------


REFERENCE_DONE = "counts.json"  # written last: a cache entry without it is absent


def reference_cache_root(cfg: EvalConfig) -> tuple[pafs.FileSystem, str]:
    """The filesystem and directory of the reference statistics cache (`reference_cache`, a local path or a URI;
    default `<output>/reference_stats`)."""
    return output_root(cfg.reference_cache or f"{cfg.output.rstrip('/')}/reference_stats")


def reference_cache_path(cfg: EvalConfig, root: str, res: int, data_fp: str) -> str:
    """The cache entry (a directory under `root`) of the reference statistics at `res`: a hash of what they
    depend on, nothing else."""
    key = {"data": data_fp, "kind": cfg.data_kind, "res": res, "protocol": cfg.patches.to_dict(),
           "extractor": cfg.extractor, "weights": cfg.inception_weights, "pr_samples": cfg.pr_samples,
           "upsample_truth": cfg.upsample_truth}
    return f"{root.rstrip('/')}/ref_{res}_{config_hash(key)}"


def reference_is_cached(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(f"{path}/{REFERENCE_DONE}").type == pafs.FileType.File


def save_reference(fs: pafs.FileSystem, path: str, stats: dict[str, RunningStats], sample: Optional[FeatureSample],
                   counts: dict) -> None:
    """Write the cache entry `path`: one RunningStats npz per feature, the sample, then counts.json, so a reader
    never takes half an entry for one. Where renames are atomic, into a temporary directory renamed at the end;
    on object stores in place (a rerun overwrites what a crashed one left: the same key gives the same files).
    An entry another evaluation completed first is kept."""
    if reference_is_cached(fs, path):
        return
    atomic = renames_are_atomic(fs)
    target = f"{path}.tmp-{os.getpid()}" if atomic else path
    if atomic:
        remove_dir(fs, target)
    fs.create_dir(target, recursive=True)
    for name, s in stats.items():
        _write_bytes(fs, f"{target}/{name}.npz", s.to_npz(io.BytesIO()).getvalue())
    if sample is not None and len(sample):
        buffer = io.BytesIO()
        np.savez(buffer, features=sample.features, priorities=sample.priorities, capacity=sample.capacity)
        _write_bytes(fs, f"{target}/sample.npz", buffer.getvalue())
    write_json(fs, f"{target}/{REFERENCE_DONE}", counts)
    if atomic:
        try:
            fs.move(target, path)
        except OSError:  # another evaluation cached the same entry first
            fs.delete_dir(target)


def load_reference(fs: pafs.FileSystem, path: str) -> tuple[dict[str, RunningStats], Optional[FeatureSample], dict]:
    """A complete cache entry written by save_reference."""
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
    stats = {f: RunningStats.from_npz(_read_buffer(fs, f"{path}/{f}.npz")) for f in FEATURES if f"{f}.npz" in names}
    sample = None
    if "sample.npz" in names:
        with np.load(_read_buffer(fs, f"{path}/sample.npz")) as z:
            sample = FeatureSample(int(z["capacity"])).add(z["features"], z["priorities"])
    return stats, sample, read_json(fs, f"{path}/{REFERENCE_DONE}")


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def _read_buffer(fs: pafs.FileSystem, path: str) -> io.BytesIO:
    """A whole (small) file in memory: np.load needs a seekable file."""
    with fs.open_input_stream(path) as f:
        return io.BytesIO(f.read())


# ---- the driver ---------------------------------------------------------------------------------------------


def run_evaluate(config: EvalConfig | Mapping[str, Any]) -> StageResult:
    """Evaluate as configured (conf/eval/*.yaml); a complete output with the same fingerprint is reused.
    `config`: an EvalConfig, or a mapping checked into one (ValueError naming the key)."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    cfg = dataclass_from(EvalConfig, config)
    start = time.time()
    cfg.ray.init()
    p = plan(cfg)
    data_fp = fingerprint(p.fs, p.input_files, {"limit": cfg.limit, "selection": "per-resolution", "kind": cfg.data_kind,
                                                "reference": p.reference_files,
                                                "holdout": p.holdout})
    model_dir = Path(cfg.model or "")
    model_files = sorted(f for f in model_dir.glob("*") if f.is_file()) if cfg.model and model_dir.is_dir() else []
    params = {k: v for k, v in asdict(cfg).items() if k not in ("ray", "mlflow", "output", "workers")}
    fp = config_hash({"data": data_fp, "params": params,
                      "model": [(f.name, file_digest(f)) for f in model_files]})  # content: a re-export is the same model
    fs, root = output_root(cfg.output)
    out_dir = f"{root.rstrip('/')}/{fp}"  # a path on fs
    where = output_uri(cfg.output, fp)  # what people and the next stage see: with its scheme
    if is_complete(fs, out_dir):
        print(f"[evaluate] complete output found, nothing to do: {where}", flush=True)
        return StageResult(where, read_json(fs, f"{out_dir}/results.json"), skipped=True)

    lpips_note = lpips_status(cfg)
    cache_fs, cache_root = reference_cache_root(cfg)
    cache = {res: reference_cache_path(cfg, cache_root, res, data_fp) for res in cfg.resolutions}
    cached = all(reference_is_cached(cache_fs, path) for path in cache.values())
    print(f"[evaluate] {p.samples} samples in {len(p.units)} units, resolutions {cfg.resolutions}, decoders "
          f"{cfg.decoders}; reference statistics {'cached' if cached else 'computed in this run'}", flush=True)

    lineage = {"infgen.stage": "evaluate", "infgen.input": cfg.data, "infgen.output": where,
               "infgen.model": str(cfg.model), "infgen.config_hash": config_hash(params)}
    with cfg.mlflow.tracker(cfg.name, tags=lineage, system_metrics=True) as tracker:
        tracker.log_params({**params, **cfg.patches.to_dict(), "extractor_id": extractor_id(cfg),
                            "lpips_status": lpips_note, "samples": p.samples, "workers": asdict(cfg.workers)})
        workers = cfg.workers
        actor_cls = ray.remote(EvalWorker).options(num_cpus=workers.cpus_per_actor, num_gpus=workers.num_gpus)
        actors = [actor_cls.remote(cfg, not cached, lpips_note == "pretrained", p.grid_keys, p.aspect)
                  for _ in range(workers.num_actors)]
        units = p.units + ([] if cached else p.reference_units)
        pool = ActorPool(actors)
        for _ in tqdm(pool.map_unordered(lambda actor, unit: actor.process.remote(unit), units), total=len(units),
                      desc="evaluate", unit="unit", mininterval=2):
            pass

        rows, summary = collect(cfg, actors, cache_fs, cache, cached)
        out, results = write_outputs(cfg, fs, out_dir, rows, summary, p, lpips_note, cached, time.time() - start)
        version = tracker.model_version(str(cfg.model), exported_record(cfg.model))
        if version is not None:  # the evaluation is linked to the model version it scored, and shows on its page
            tracker.set_tags({"infgen.model_name": version.name, "infgen.model_version": version.version})
        for row in rows:  # the resolution in the name, not on the step axis
            tracker.log_metrics({f"{m}/{row['decoder']}/{row['resolution']}": row[m]
                                 for m in METRICS if row.get(m) is not None},
                                model_id=logged_model_id(version) if row["decoder"] == "infgen" else None)
        tracker.log_metrics({"eval_seconds": time.time() - start, "samples": p.samples})
        tracker.log_table(rows, "evaluation/results_table.json")
        tracker.set_note(evaluation_note(rows, p.samples, extractor_id(cfg), lpips_note))
        with local_files(fs, [f"{out_dir}/{name}" for name in out]) as paths:
            for path in paths:
                tracker.log_artifact(path, "evaluation")
        for actor in actors:
            ray.kill(actor)
        mark_success(fs, out_dir)
        print_table(rows)
        print(f"[evaluate] results: {where}  (MLflow run {tracker.run_id})", flush=True)
        return StageResult(where, results, run_id=tracker.run_id)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2 ** 24), b""):
            h.update(block)
    return h.hexdigest()


def lpips_status(cfg: EvalConfig) -> str:
    """'pretrained', or why LPIPS is not reported (it never falls back to a random backbone)."""
    if not cfg.lpips:
        return "disabled in the config"
    try:
        load_lpips(cfg.lpips_net, cfg.lpips_weights)
        return "pretrained"
    except LPIPSUnavailable as e:
        log.warning("LPIPS is not reported: %s", e)
        return f"not reported: {e}"


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


# ---- outputs ------------------------------------------------------------------------------------------------


def write_outputs(cfg: EvalConfig, fs: pafs.FileSystem, out_dir: str, rows: list[dict], summary: dict, p: Plan,
                  lpips_note: str, reference_cached: bool, seconds: float) -> tuple[list[str], dict]:
    """results.csv/json, per_image.csv, metrics_vs_resolution.png, crops_<R>.png; returns their names and the
    content of results.json."""
    fs.create_dir(out_dir, recursive=True)
    names = ["results.json", "results.csv", "per_image.csv", "metrics_vs_resolution.png"]
    results = {
        "rows": rows, "protocol": cfg.patches.to_dict(), "extractor": extractor_id(cfg), "lpips": lpips_note,
        "resolutions": cfg.resolutions, "decoders": cfg.decoders, "model": cfg.model, "data": cfg.data,
        "data_kind": cfg.data_kind, "samples": p.samples, "reference_files": len(p.reference_files),
        "broken_reference_images": int(summary["counts"].get((REFERENCE, 0), {}).get("broken", 0)),
        "reference_cached": reference_cached, "seconds": seconds, "definitions": DEFINITIONS}
    write_json(fs, f"{out_dir}/results.json", results)
    columns = ["decoder", "resolution", *METRICS, "images", "patches", "skipped_small", "reference_images",
               "reference_patches", "truth_upsampled", "truth_skipped"]
    _write_csv(fs, f"{out_dir}/results.csv", rows, columns)
    _write_csv(fs, f"{out_dir}/per_image.csv", summary["per_image"],
               ["key", "decoder", "resolution", "height", "width", "psnr", "ssim", "lpips"])
    _write_bytes(fs, f"{out_dir}/metrics_vs_resolution.png", plot_metrics(rows, cfg.decoders))
    for res in cfg.resolutions:
        png = crop_grid(summary["crops"], p.grid_keys, res, cfg.decoders)
        if png:
            _write_bytes(fs, f"{out_dir}/crops_{res}.png", png)
            names.append(f"crops_{res}.png")
    return names, results


DEFINITIONS = {
    "fid": "Fréchet distance of Inception pool_3 (2048-d) of whole images (resized to 299²) vs the reference",
    "fidp": "the same on the patches of the protocol (patch_* params), real and decoded cut identically",
    "sfidp": "Fréchet distance of spatial features: first 7 channels of mixed_6/conv (17×17×7 = 2023-d) of patches",
    "kidp": "KID (clean-fid kernel_distance, cubic kernel) on patch pool_3 features of the priority sample",
    "precisionp": "improved precision (k=pr_k) of decoded patches against the reference patches",
    "recallp": "improved recall (k=pr_k) of the reference patches against the decoded patches",
    "psnr": "mean per-image PSNR (dB) against the ground truth at the same size (reconstruction only)",
    "ssim": "mean per-image SSIM (torchmetrics, Gaussian 11, σ 1.5)",
    "lpips": "mean per-image LPIPS with a pretrained backbone (lpips_net); absent when unavailable",
    "latency_s": "decode seconds per image on one worker (baselines include the VAE decode at native size)",
}


def _write_csv(fs: pafs.FileSystem, path: str, rows: list[dict], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _write_bytes(fs, path, buffer.getvalue().encode())


def plot_metrics(rows: list[dict], decoders: list[str]) -> bytes:
    """One panel per metric, metric against resolution, one line per decoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if any(r.get(m) is not None for r in rows)]
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(metrics) / cols), cols, figsize=(4 * cols, 3 * math.ceil(len(metrics) / cols)),
                             squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for decoder in decoders:
            points = [(r["resolution"], r[metric]) for r in rows if r["decoder"] == decoder and r.get(metric) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=decoder)
        ax.set_title(metric)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("resolution (long side, px)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def crop_grid(crops: dict, keys: list[str], res: int, decoders: list[str]) -> Optional[bytes]:
    """Centre crops at full resolution, side by side: the reference (ground truth), then each decoder."""
    from infgen.visualize import image_grid

    sources = [s for s in [REFERENCE, *decoders] if any((key, res, s) in crops for key in keys)]
    rows = []
    for key in keys:
        cells = [crops.get((key, res, s)) for s in sources]
        if all(c is None for c in cells):
            continue
        rows.append([torch.from_numpy(c.copy()).permute(2, 0, 1).float() / 127.5 - 1 if c is not None
                     else torch.ones(3, 8, 8) for c in cells])
    if not rows:
        return None
    labels = [f"{'truth' if s == REFERENCE else s} {res}" for s in sources]
    buffer = io.BytesIO()
    image_grid(rows, labels, cell=max(max(c.shape[1:]) for row in rows for c in row)).save(buffer, format="PNG")
    return buffer.getvalue()


def exported_record(model: Optional[str]) -> Optional[dict]:
    """What training recorded beside an exported model directory (pipelines.train.EXPORTED), if anything."""
    from pipelines.train import EXPORTED

    if not model or "://" in model or model.startswith(("runs:/", "models:/")):
        return None
    path = Path(model).parent / EXPORTED
    return json.loads(path.read_text()) if path.is_file() else None


def evaluation_note(rows: list[dict], samples: int, extractor: str, lpips_note: str) -> str:
    """One paragraph: infgen against VAE + bicubic at each resolution (PSNR, SSIM), and the caveats."""
    by = {(r["decoder"], r["resolution"]): r for r in rows}
    parts = []
    for res in sorted({r["resolution"] for r in rows}):
        ours, base = by.get(("infgen", res)), by.get(("vae_bicubic", res))
        if ours and base and ours.get("psnr") is not None and base.get("psnr") is not None:
            parts.append(f"{res}: {ours['psnr']:.2f} vs {base['psnr']:.2f} dB ({ours['psnr'] - base['psnr']:+.2f})")
    head = (f"infgen against VAE decode + bicubic, PSNR on {samples} held-out samples: " + "; ".join(parts) + "."
            if parts else f"{samples} samples; decoders: {sorted({r['decoder'] for r in rows})}.")
    return (f"{head} Patch features: {extractor}. LPIPS: {lpips_note}. Full table: evaluation/results_table.json "
            f"and results.csv; side-by-side crops: evaluation/crops_<resolution>.png.")


def print_table(rows: list[dict]) -> None:
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    columns = ["decoder", "resolution", "fidp", "sfidp", "fid", "kidp", "precisionp", "recallp", "psnr", "ssim",
               "lpips", "latency_s"]
    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
