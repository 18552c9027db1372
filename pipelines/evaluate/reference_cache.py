"""The reference statistics cache: the ground truth (or the reference images) at each resolution depends only on
the data, the selection, the patch protocol, the resolution and the extractor, so it is saved under a hash of
those and reused by the next evaluation of another model on the same data."""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import pyarrow.fs as pafs

from infgen.distribution_metrics import FeatureSample, RunningStats
from infgen.evaluation import FEATURES
from pipelines.common import output_root, publish, read_json, staging_path, write_bytes, write_json
from pipelines.evaluate.config import EvalConfig
from pipelines.tracking import config_hash

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
    never takes half an entry for one. Staged as one directory (pipelines.common.staging_path: a temporary one
    renamed at the end where renames are atomic; on object stores in place, where a rerun overwrites what a
    crashed one left: the same key gives the same files). An entry another evaluation completed first is kept."""
    if reference_is_cached(fs, path):
        return
    staged = staging_path(fs, path)
    fs.create_dir(staged, recursive=True)
    for name, s in stats.items():
        write_bytes(fs, f"{staged}/{name}.npz", s.to_npz(io.BytesIO()).getvalue())
    if sample is not None and len(sample):
        buffer = io.BytesIO()
        np.savez(buffer, features=sample.features, priorities=sample.priorities, capacity=sample.capacity)
        write_bytes(fs, f"{staged}/sample.npz", buffer.getvalue())
    write_json(fs, f"{staged}/{REFERENCE_DONE}", counts)
    try:
        publish(fs, staged, path)
    except OSError:  # another evaluation cached the same entry first
        fs.delete_dir(staged)


def load_reference(fs: pafs.FileSystem, path: str) -> tuple[dict[str, RunningStats], Optional[FeatureSample], dict]:
    """A complete cache entry written by save_reference."""
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
    stats = {f: RunningStats.from_npz(_read_buffer(fs, f"{path}/{f}.npz")) for f in FEATURES if f"{f}.npz" in names}
    sample = None
    if "sample.npz" in names:
        with np.load(_read_buffer(fs, f"{path}/sample.npz")) as z:
            sample = FeatureSample(int(z["capacity"])).add(z["features"], z["priorities"])
    return stats, sample, read_json(fs, f"{path}/{REFERENCE_DONE}")


def _read_buffer(fs: pafs.FileSystem, path: str) -> io.BytesIO:
    """A whole (small) file in memory: np.load needs a seekable file."""
    with fs.open_input_stream(path) as f:
        return io.BytesIO(f.read())
