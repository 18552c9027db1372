"""What an evaluation scores: the selected samples, cut into work units (at most `workers.chunk_rows` rows of one
parquet row group, one latent file, or a chunk of reference images) that the actors take one at a time."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import pyarrow.fs as pafs

from infgen.io import LATENT_SUFFIXES, load_latents
from infgen.models import CONFIG_NAME
from pipelines import shards
from pipelines.common import resolve_files, uri
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.model import holdout_record
from pipelines.holdout import RECORD, Holdout, HoldoutRecord

log = logging.getLogger(__name__)

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
    holdout_source: str = ""  # where that split came from: "config", "model record" or "none"
    trained_rows: int = 0  # selected rows the model's record says it trained on (allow_trained_rows)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def plan(cfg: EvalConfig) -> Plan:
    """The units of an evaluation: selected encoded rows (plan_encoded), or latent files and chunks of reference
    images. Raises ValueError for data that cannot be evaluated as configured (named)."""
    chunk_rows = cfg.workers.chunk_rows
    if cfg.data_kind == "encoded":
        return plan_encoded(cfg, chunk_rows)
    fs, paths = resolve_files(cfg.data, suffix=LATENT_SUFFIXES, key="data")
    ref_fs, ref_paths = resolve_files(cfg.reference, suffix=IMAGE_SUFFIXES, key="reference")
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
    return Plan(units, paths, fs, len(paths), grid_keys, first.shape[3] / first.shape[2], reference_units, ref_paths)


def expected_latent_channels(cfg: EvalConfig) -> Optional[int]:
    """The model's latent channels, when its config is readable here (a local exported model)."""
    config = Path(cfg.model or "") / CONFIG_NAME
    return json.loads(config.read_text()).get("latent_channels") if cfg.model and config.is_file() else None


def plan_encoded(cfg: EvalConfig, chunk_rows: int) -> Plan:
    """Units of at most `chunk_rows` selected rows of one parquet row group, each row with the resolutions it is
    evaluated at. The selection: the rows the split holds out (`holdout`, else the model's record of the split it
    was trained with, else every row), then per resolution (`select`). Raises ValueError when nothing is
    selected, or when rows the model trained on are, unless allow_trained_rows."""
    record = scored_model_record(cfg)
    holdout, source = ((cfg.holdout.read(), "config") if cfg.holdout is not None else
                       (record.holdout, "model record") if record is not None else (Holdout(), "none"))
    fs, paths = resolve_files(cfg.data, suffix=".parquet", key="data")
    groups = [(path, g, rows) for path in paths  # (path, row group, [(key, hr long side)])
              for g, rows in enumerate(shards.row_group_keys(fs, path, uri(fs, path)))]
    files = shards.key_urls(fs, paths) if holdout or record is not None else []
    if holdout:  # only the images training held out, by the same split
        keep = set(holdout.keys_in(files))
        groups = [(path, g, [r for r in rows if r[0] in keep]) for path, g, rows in groups]
    ordered = sorted((key_hash(k), k, side) for _, _, rows in groups for k, side in rows)
    if not ordered:
        raise ValueError(f"data {cfg.data}: the shards hold no rows"
                         + (f" held out by holdout ({holdout.describe()}; from the {source})" if holdout else ""))
    selected = select([(k, side) for _, k, side in ordered], cfg.resolutions, cfg.limit, cfg.upsample_truth,
                      cfg.limit_at)
    trained = refuse_trained_rows(cfg, record, files, set(selected))
    units = []  # at most chunk_rows samples each: many small units keep every actor busy to the end
    for path, g, rows in groups:
        chosen = [k for k, _ in rows if k in selected]
        units += [{"kind": "encoded", "uri": uri(fs, path), "path": path, "row_group": g, "chunk_rows": chunk_rows,
                   "keys": chosen[i:i + chunk_rows], "resolutions": {k: selected[k] for k in chosen[i:i + chunk_rows]}}
                  for i in range(0, len(chosen), chunk_rows)]
    grid_keys = [k for _, k, _ in ordered if k in selected][:cfg.grid.count]
    return Plan(units, paths, fs, len(selected), grid_keys, holdout=holdout.describe(), holdout_source=source,
                trained_rows=trained)


def select(rows: Sequence[tuple[str, Optional[int]]], resolutions: Sequence[int], limit: Optional[int],
           upsample_truth: bool, limit_at: Optional[Mapping[int, int]] = None) -> dict[str, list[int]]:
    """Which rows are evaluated at which resolutions: {key: [resolution, ...]}. rows: (key, long side of the
    ground truth in px, None when unknown), in selection order (smallest key hash first: deterministic,
    independent of file order). At each resolution, its count is limit_at[resolution] if given, else `limit`.
    Without a count, every row (the accumulator skips and counts a truth too small for it). With one, the first
    that many rows whose ground truth reaches it (any row when `upsample_truth`, or when its size is unknown: the
    accumulator then skips and counts it), so a large resolution gets that many samples of real pixels too, not
    only the few of the first rows that happen to be large enough."""
    chosen: dict[str, list[int]] = {}
    for res in resolutions:
        count = (limit_at or {}).get(res, limit) or None
        reaching = [k for k, side in rows if count is None or upsample_truth or side is None or side >= res]
        for key in reaching[:count]:
            chosen.setdefault(key, []).append(res)
    return chosen


def scored_model_record(cfg: EvalConfig) -> Optional[HoldoutRecord]:
    """The record of the split the scored model was trained with (pipelines.holdout.HoldoutRecord). None when no
    infgen decoder scores a model, or, with a logged warning, when the model has no record."""
    if not any(d.startswith("infgen") for d in cfg.decoders):
        return None
    record = holdout_record(cfg.model, cfg.mlflow.tracking_uri)
    if record is None:
        log.warning("model %s has no holdout record (%s): which rows it trained on is not known, and the rows "
                    "selected are scored as they are", cfg.model, RECORD)
    return record


def refuse_trained_rows(cfg: EvalConfig, record: Optional[HoldoutRecord],
                        files: list[tuple[list[str], list[Optional[str]]]], selected: set[str]) -> int:
    """How many `selected` rows the model trained on (by its record; none without one). Raises ValueError naming
    the model and the count when there are any, unless allow_trained_rows (then a logged warning)."""
    trained = record.trained_keys(files, selected) if record is not None else []
    if trained and not cfg.allow_trained_rows:
        raise ValueError(f"model {cfg.model} was trained on {len(trained)} of the {len(selected)} rows selected for "
                         f"evaluation (its {RECORD}: {record.holdout.describe()}, on {record.data}); score the rows "
                         f"it held out (holdout: null, the model's record), or set allow_trained_rows: true to score "
                         f"them anyway")
    if trained:
        log.warning("scoring %d rows that model %s was trained on (allow_trained_rows: true)", len(trained), cfg.model)
    return len(trained)
