"""Batch decoding: a directory of latent files → images at one or more sizes, on Ray Data actors.

    run_decode({"model": "models:/infgen-demo@newest", "input": "latents/", "output": "images/",
                "sizes": ["1024", "2048x1152"]}) -> StageResult

Inputs are latent files (.pt, .npy, .safetensors with (C, h, w) or (B, C, h, w), as `infgen decode` takes them:
infgen.io.read_latents) in a directory (recursively), a glob or a URI (s3://...). Each actor loads the model once
(an exported directory, a checkpoint, or an MLflow runs:/ or models:/ URI: pipelines.evaluate.model.load_model) and
takes one file at a time: it decodes every latent at every size and writes the images itself,
`<output>/<input's relative dir>/<stem>[_<i>]_<W>x<H>.<format>`, then a completion marker for that file. The
driver holds the file list and one stats row per file, never an image. A rerun skips files whose marker exists;
a file that cannot be read or decoded is counted and named in `_stats.json` (and MLflow), never fatal.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Mapping, Optional

import numpy as np
import pyarrow.fs as pafs

from pipelines.common import (STATS, StageResult, local_files, output_root, output_uri, publish, resolve_files,
                              staging_path, uri, write_json)
from pipelines.config import MlflowConfig, Number, RayConfig, dataclass_from

DONE_SUFFIX = ".done"  # per input file, written after its images: the file is complete
DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class DecodeWorkers:
    """The `workers` section: the actor pool."""

    num_actors: int = 1  # model copies decoding files in parallel
    cpus_per_actor: Number = 1
    num_gpus: Number = 0  # per actor
    dtype: str = "fp32"  # fp32 | fp16 | bf16: weights and compute

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"decode config: workers.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.num_actors < 1 or self.cpus_per_actor <= 0:
            raise ValueError(f"decode config: workers.num_actors={self.num_actors}, workers.cpus_per_actor="
                             f"{self.cpus_per_actor}: each must be positive")


@dataclass
class DecodeConfig:
    """The batch-decoding job's config; conf/decode/local.yaml documents every key. Checked on construction:
    a ValueError names the key that is wrong."""

    CONFIG_NAME: ClassVar[str] = "decode"
    REQUIRED: ClassVar[tuple] = ("model", "input", "output")  # null or "": an error naming them (dataclass_from)
    model: Optional[str] = None
    input: Optional[str] = None
    output: Optional[str] = None
    sizes: list = field(default_factory=lambda: [1024])
    format: str = "png"
    batch_size: int = 4
    tile: Optional[int] = None
    unscaled: bool = False
    name: str = "decode"
    workers: DecodeWorkers = field(default_factory=DecodeWorkers)
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="infgen-decode"))
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        from infgen.images import IMAGE_FORMATS
        from infgen.models import parse_size

        self.sizes = [parse_size(_size(s), 2 ** 31) for s in self.sizes]
        if not self.sizes:
            raise ValueError("decode config: sizes is empty")
        if self.format not in IMAGE_FORMATS:
            raise ValueError(f"decode config: format must be one of {IMAGE_FORMATS}, got {self.format!r}")
        if self.batch_size < 1:
            raise ValueError(f"decode config: batch_size must be at least 1, got {self.batch_size}")
        if self.tile is not None and (self.tile < 8 or self.tile % 8):
            raise ValueError(f"decode config: tile must be a positive multiple of 8 (or null: untiled), got "
                             f"{self.tile}")


def _size(value: Any) -> Any:
    """1024, "1024", "2048x1152" (WIDTHxHEIGHT, as the CLI) or [H, W] → what parse_size takes."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        if not all(p.strip().isdigit() for p in parts) or len(parts) > 2:
            raise ValueError(f"decode config: size {value!r} is not N or WIDTHxHEIGHT")
        return int(parts[0]) if len(parts) == 1 else (int(parts[1]), int(parts[0]))
    return tuple(value) if isinstance(value, (list, tuple)) else value


class FileDecoder:
    """The Ray Data actor: one model per actor, one latent file per row (see the module docstring)."""

    def __init__(self, cfg: DecodeConfig, tracking_uri: Optional[str], in_fs: pafs.FileSystem,
                 out_fs: pafs.FileSystem) -> None:
        import torch

        from pipelines.evaluate.model import load_model

        self.cfg, self.in_fs, self.out_fs = cfg, in_fs, out_fs
        self.device = torch.device("cuda" if cfg.workers.num_gpus and torch.cuda.is_available() else "cpu")
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.workers.dtype]
        self.model = load_model(cfg.model, tracking_uri).to(self.device, dtype).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.decode_file(str(path), str(target)) for path, target in zip(batch["path"], batch["target"])]
        return {key: np.array([r[key] for r in rows]) for key in rows[0]}

    def decode_file(self, path: str, target: str) -> dict[str, Any]:
        """Decode one file into `target` + names; a stats row (latents, images, error, seconds)."""
        import torch

        from infgen.images import decode_in_batches, decoded_name, encode_image
        from infgen.io import read_latents

        start = time.perf_counter()
        stem = os.path.basename(path).rsplit(".", 1)[0]
        try:
            with self.in_fs.open_input_stream(path) as f:
                latents = read_latents(f.read(), uri(self.in_fs, path))
            written = 0
            self.out_fs.create_dir(target, recursive=True)
            def decode(chunk: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
                return self.model.decode(chunk, size, tile=self.cfg.tile, scaled=not self.cfg.unscaled)

            with torch.no_grad():
                for size, index, image in decode_in_batches(decode, latents.to(self.device), self.cfg.sizes,
                                                            self.cfg.batch_size):
                    name = f"{target}/{decoded_name(stem, index, size, self.cfg.format)}"
                    staged = staging_path(self.out_fs, name)
                    with self.out_fs.open_output_stream(staged) as out:
                        out.write(encode_image(image, self.cfg.format))
                    publish(self.out_fs, staged, name)
                    written += 1
            with self.out_fs.open_output_stream(f"{target}/{stem}{DONE_SUFFIX}") as out:
                out.write(str(written).encode())
            error = ""
        except Exception as e:  # one bad file is counted and named, never the end of the job
            latents, written = None, 0
            message = str(e) if str(e).startswith(uri(self.in_fs, path)) else f"{uri(self.in_fs, path)}: {e}"
            error = f"{type(e).__name__}: {message}" if not isinstance(e, ValueError) else message
        return {"path": path, "latents": 0 if latents is None else len(latents), "images": written, "error": error,
                "seconds": time.perf_counter() - start}


def run_decode(config: DecodeConfig | Mapping[str, Any]) -> StageResult:
    """Decode every latent file of `input` at every size of `sizes` into `output` (see the module docstring).
    `config`: a DecodeConfig, or a mapping checked into one (ValueError naming the key)."""
    import ray
    from tqdm import tqdm

    from infgen.io import LATENT_SUFFIXES

    cfg = dataclass_from(DecodeConfig, config)
    t0 = time.perf_counter()
    in_fs, paths = resolve_files(cfg.input, LATENT_SUFFIXES)
    out_fs, root = output_root(cfg.output)
    out_fs.create_dir(root, recursive=True)
    base = paths[0].rsplit("/", 1)[0] if len(paths) == 1 else os.path.commonpath(paths)
    rels = [os.path.relpath(os.path.dirname(p), base) for p in paths]  # the input tree, mirrored
    targets = [root.rstrip("/") if rel == "." else f"{root.rstrip('/')}/{rel}" for rel in rels]
    done = [out_fs.get_file_info(f"{t}/{os.path.basename(p).rsplit('.', 1)[0]}{DONE_SUFFIX}").type
            == pafs.FileType.File for p, t in zip(paths, targets)]
    todo = [(p, t) for p, t, d in zip(paths, targets, done) if not d]
    print(f"decode: {len(paths)} latent files, {len(paths) - len(todo)} done already, {len(todo)} to decode at "
          + ", ".join(f"{w}x{h}" for h, w in cfg.sizes) + f" → {output_uri(cfg.output, '')}", flush=True)

    rows = []
    if todo:
        cfg.ray.init()
        w = cfg.workers
        ds = ray.data.from_items([{"path": p, "target": t} for p, t in todo]).map_batches(
            FileDecoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=int(w.num_actors)),
            num_cpus=w.cpus_per_actor, num_gpus=w.num_gpus,
            fn_constructor_kwargs={"cfg": cfg, "tracking_uri": cfg.mlflow.tracking_uri, "in_fs": in_fs,
                                   "out_fs": out_fs})
        with tqdm(total=len(todo), unit="file", desc="decode") as bar:
            for row in ds.iter_rows():
                rows.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
                bar.update()
    failed = {uri(in_fs, r["path"]): r["error"] for r in rows if r["error"]}
    seconds = time.perf_counter() - t0
    images = sum(r["images"] for r in rows)
    stats = {"stage": "decode", "input": cfg.input, "output": output_uri(cfg.output, ""), "model": cfg.model,
             "files": len(paths), "files_done_before": len(paths) - len(todo), "files_decoded": len(rows) - len(failed),
             "files_failed": len(failed), "failed": failed, "latents": sum(r["latents"] for r in rows),
             "images": images, "sizes": [[h, w] for h, w in cfg.sizes], "format": cfg.format,
             "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 3) if seconds else None}
    write_json(out_fs, f"{root.rstrip('/')}/{STATS}", stats)
    run_id = _track(cfg, stats, out_fs, root)
    print(f"decode: {stats['files_decoded']} files decoded ({images} images), {len(failed)} failed"
          + "".join(f"\n  {problem}" for problem in failed.values()), flush=True)
    return StageResult(output=stats["output"].rstrip("/"), stats=stats, skipped=not todo, run_id=run_id)


def _track(cfg: DecodeConfig, stats: dict, out_fs: pafs.FileSystem, root: str) -> Optional[str]:
    from pipelines.tracking import config_hash

    config = asdict(cfg)
    tags = {"infgen.stage": "decode", "infgen.input": cfg.input, "infgen.output": stats["output"],
            "infgen.model": cfg.model, "infgen.config_hash": config_hash(config)}
    with cfg.mlflow.tracker(cfg.name, tags=tags) as tracker:
        tracker.log_params(config)
        tracker.log_metrics({k: stats[k] for k in ("files", "files_decoded", "files_failed", "latents", "images",
                                                   "seconds", "images_per_s") if stats[k] is not None})
        tracker.log_dict(stats, STATS)
        tracker.set_note(f"{stats['files_decoded']} latent files decoded by {cfg.model} into {stats['images']} images "
                         f"({', '.join(f'{w}x{h}' for h, w in cfg.sizes)}); {stats['files_failed']} failed "
                         f"(named in {STATS}).")
        first = sorted(i.path for i in out_fs.get_file_info(pafs.FileSelector(root, recursive=True))
                       if i.path.endswith(f".{cfg.format}"))[:2]
        with local_files(out_fs, first) as local:  # two of the images, as they were written
            for path in local:
                tracker.log_artifact(path, "examples")
        return tracker.run_id
