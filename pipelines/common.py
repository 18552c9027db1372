"""What every Ray stage shares: starting Ray, resolving inputs on any pyarrow filesystem, deriving the
output location from inputs + config, and finishing outputs atomically (`_stats.json`, `_SUCCESS`)."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

import pyarrow.fs as pafs

SUCCESS = "_SUCCESS"
STATS = "_stats.json"


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Connect to a cluster (`address`, or RAY_ADDRESS as `ray job submit` sets it) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local clusters: no token file in ~/.ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # with the dashboard (on loopback): Ray's State API needs it, and Ray Train's placement-group cleaner
        # otherwise warns on every check that it cannot query the controller (hundreds of lines per run)
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False)
    quiet_ray_data()


def quiet_ray_data() -> None:
    """Ray Data's progress bars and per-execution banners off (they travel with each dataset to the actors that
    run it): in a job's log they are thousands of redrawn lines that bury the stage's own progress. INFGEN_VERBOSE=1
    keeps them."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.enable_operator_progress_bars = verbose()
    context.print_on_execution_start = verbose()


def verbose() -> bool:
    """INFGEN_VERBOSE=1: Ray's own progress bars and INFO lines stay on (the jobs print their own progress)."""
    return os.environ.get("INFGEN_VERBOSE") == "1"


def resolve_files(spec: str, suffix: str | tuple[str, ...] = ".parquet",
                  key: str = "input") -> tuple[pafs.FileSystem, list[str]]:
    """A file, a directory (its `*suffix` files, recursively), or a glob, locally or at a URI
    (s3://, gs://, hdfs://, file://) → (filesystem, sorted paths). No match is a ValueError naming the config
    `key` and the spec."""
    fs, path = pafs.FileSystem.from_uri(spec) if "://" in spec else (pafs.LocalFileSystem(), os.path.abspath(spec))
    if any(ch in path for ch in "*?["):
        base = path[:min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        paths = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            paths = [path]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            paths = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
                     and not os.path.basename(i.path).startswith(("_", "."))]
        else:
            raise ValueError(f"{key} {spec!r}: no such file or directory")
    if not paths:
        raise ValueError(f"{key} {spec!r}: no {' / '.join(suffix) if isinstance(suffix, tuple) else suffix} "
                         "files found")
    return fs, sorted(paths)


def fingerprint(fs: pafs.FileSystem, paths: list[str], params: Mapping[str, Any]) -> str:
    """Hash of the input files (path, size, mtime) and the parameters that shape the output."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for info in fs.get_file_info(paths):
        h.update(f"{info.path}\0{info.size}\0{info.mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def output_root(spec: str) -> tuple[pafs.FileSystem, str]:
    """An output location (a local path or a URI) → (filesystem, path on it; object-store paths lose the scheme)."""
    return pafs.FileSystem.from_uri(spec) if "://" in spec else (pafs.LocalFileSystem(), os.path.abspath(spec))


def output_uri(spec: str, name: str) -> str:
    """`name` inside the output location `spec` as the user wrote it: a URI keeps its scheme (s3://b/out/NAME,
    file:///out/NAME), a local path becomes absolute. What a stage prints, returns and tags."""
    return f"{spec.rstrip('/')}/{name}" if "://" in spec else os.path.join(os.path.abspath(spec), name)


def uri(fs: pafs.FileSystem, path: str) -> str:
    """A path on `fs` as a user writes it: local paths as they are, object-store paths with their scheme
    (pyarrow's S3 path `bucket/key` → `s3://bucket/key`), so that what is printed, returned and tagged can be
    passed to the next stage as it is."""
    scheme = {"s3": "s3", "gcs": "gs"}.get(fs.type_name)
    return f"{scheme}://{path}" if scheme and "://" not in path else path


@contextlib.contextmanager
def local_files(fs: pafs.FileSystem, paths: list[str]) -> Iterator[list[str]]:
    """Local paths for files on any filesystem, e.g. for MLflow, which logs local files: the paths themselves on
    a local filesystem, else temporary copies, removed on exit."""
    if renames_are_atomic(fs):  # local
        yield list(paths)
        return
    with tempfile.TemporaryDirectory(prefix="infgen-") as tmp:
        local = [os.path.join(tmp, os.path.basename(path)) for path in paths]
        for path, target in zip(paths, local):
            pafs.copy_files(path, target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield local


def renames_are_atomic(fs: pafs.FileSystem) -> bool:
    """True on local (and shared POSIX) filesystems. Object stores (s3, gcs, ...) rename by copying, and S3's
    CopyObject refuses objects over 5 GB; there an upload is itself atomic (visible only once complete)."""
    return fs.type_name == "local"


def staging_path(fs: pafs.FileSystem, path: str) -> str:
    """Where to write the file (or directory) `path` so that no reader ever sees half of it: a temporary name
    beside it, to be renamed (`publish`), where renames are atomic; `path` itself on object stores, where an
    upload appears whole."""
    return f"{path}.tmp-{uuid.uuid4().hex[:8]}" if renames_are_atomic(fs) else path


def publish(fs: pafs.FileSystem, staged: str, path: str) -> None:
    """Complete a write begun at staging_path(fs, path)."""
    if staged != path:
        fs.move(staged, path)


def is_complete(fs: pafs.FileSystem, directory: str) -> bool:
    return fs.get_file_info(f"{directory}/{SUCCESS}").type == pafs.FileType.File


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    """Write JSON atomically: a reader never sees half a file (staging_path)."""
    staged = staging_path(fs, path)
    with fs.open_output_stream(staged) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
    publish(fs, staged, path)


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a (small) file whole: results, plots, cached statistics."""
    with fs.open_output_stream(path) as f:
        f.write(data)


def mark_success(fs: pafs.FileSystem, directory: str) -> None:
    with fs.open_output_stream(f"{directory}/{SUCCESS}") as f:
        f.write(b"")


def remove_dir(fs: pafs.FileSystem, directory: str) -> None:
    if fs.get_file_info(directory).type == pafs.FileType.Directory:
        fs.delete_dir(directory)


@dataclass
class StageResult:
    """What every stage's Python entry point (run_filter, run_download, run_encode, ...) returns."""

    output: str  # the directory or URI the stage wrote (or found complete)
    stats: dict  # the content of its _stats.json
    skipped: bool = False  # True when a complete output already existed and nothing was done
    run_id: Optional[str] = None  # the MLflow run, when tracking worked
