"""What an evaluation scores: the selected samples, cut into work units (at most `workers.chunk_rows` rows of one
parquet row group, one latent file, or a chunk of reference images) that the actors take one at a time."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import pyarrow.fs as pafs

from infgen.io import LATENT_SUFFIXES, load_latents
from pipelines import shards
from pipelines.common import resolve_files, uri
from pipelines.evaluate.config import EvalConfig
from pipelines.holdout import Holdout

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


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
