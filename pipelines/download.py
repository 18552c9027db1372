"""Stage 2 of the data pipeline: download the filter stage's URLs into webdataset shards with img2dataset.

    python -m jobs.download --config conf/data/download.yaml input=outputs/data/filter/FINGERPRINT [key=value ...]

Layout of one output, `<output>/<fingerprint>/` (fingerprint of the input files + the parameters that shape
the output, so a rerun lands in the same place and continues):

    _input/main-00000.parquet ...  the input rows as img2dataset reads them (url, caption, row_id, metadata)
    _input/retry-001.parquet ...   one file per retry round: the rows that had failed
    shards/00000.tar  .parquet  _stats.json   img2dataset's shards (key.jpg, key.txt, key.json per sample)
    failed.parquet                 every row that has no image: url, caption, row_id, error_kind,
                                   error_message, attempts, metadata columns
    _stats.json                    rows = success + sum(failures by kind), exact and without duplicates
    _SUCCESS                       every shard of every round is done

Readers take `shards/*.tar` once `_SUCCESS` exists. Each sample's JSON carries `row_id` (its row in the
input, stable across retries), the saved metadata columns (the input's `width`/`height` become `src_width`/
`src_height`: img2dataset reserves those names for the size it stored), and the sha256 of the bytes as
downloaded.

What is stored. With `max_long_side: null` (the default) the bytes exactly as downloaded (img2dataset's
disable_all_reencoding): nothing is decoded, re-encoded or size-checked here, so the sha256 is the stored bytes'
hash. img2dataset's own decoder (OpenCV) would turn a 16-bit PNG into a white JPEG and a float TIFF into a black
or white one; the encode stage decodes instead, with `infgen.images.to_rgb` like every stage. Consequences:
  * the member is `key.<encode_format>` (`key.jpg`) whatever the bytes are (PNG, WebP, GIF, TIFF, HTML ...): the
    encode stage reads the format from the bytes (pipelines.encode.decode_image), never from the name;
  * the JSON's and shard parquet's `width`/`height`/`original_width`/`original_height` are null;
  * an HTML page, a truncated or 0-byte body, a tiny image or a decompression bomb is a success here (a few KB
    stored) and a counted skip in the encode stage (not_an_image, corrupt, empty, too_small,
    decompression_bomb); the size rules live there, on the stored image (`min_side`, `max_image_pixels`);
  * this stage's failures are those of fetching: http_<code>, timeout, connection, ssl, invalid_url,
    disallowed (an X-Robots-Tag noai opt-out), missing (img2dataset wrote no record), other.
With `max_long_side: N`, ShrinkResizer replaces img2dataset's resizer: an image whose header says its long side
exceeds N is decoded with `to_rgb` (under `max_image_pixels`), shrunk to N and stored in `encode_format` (then
width/height are set and the sha256 is of the downloaded bytes); every other body is stored as downloaded, as
above. A large image that cannot be decoded fails here, its error_kind the encode stage's reason for it
(decompression_bomb, corrupt, unsupported_mode, unsupported_format).
Every row is counted once across the stages: rows = success + failures by kind here, and the encode stage's
images_in (this stage's success) = its encoded images + its skips by reason.

Resume: rerunning the same command continues (img2dataset's incremental mode skips shards that have a
`_stats.json`). Retry: `retry_failed=true` (or `input=<that output>/failed.parquet`) downloads the failed rows
again as a new round of shards in the same output; a row that succeeds then counts once, as a success. Retry
rounds are files after the main inputs in `_input/`, so their shards get new ids and never clash with keys.

Install: `pip install -e '.[pipeline]'`. img2dataset 1.47 pins webdataset<0.3, albumentations<2, pandas<3
and opencv-python-headless<5, and imports wandb at module level; the project's own ranges are chosen to
resolve inside those pins (`pip check` stays clean). This stage never logs in to wandb (enable_wandb=False,
WANDB_MODE=disabled) and sets NO_ALBUMENTATIONS_UPDATE=1 (albumentations otherwise checks PyPI on import).

On a cluster: `distributor=ray` runs one Ray task per shard on every node (img2dataset's Ray distributor has
no back-pressure and ignores max_shard_retry: unfinished shards make this stage fail with a message to
rerun, which continues). At LAION scale, img2dataset's authors recommend a local caching DNS resolver on
every node (knot-resolver or bind, with the system resolver pointed at it): the default resolvers throttle or
fail at thousands of requests per second, which shows up here as `connection` failures. img2dataset's
resizer (OpenCV) decodes nothing in this stage: OPENCV_IO_MAX_IMAGE_PIXELS is not needed.
"""

from __future__ import annotations

import importlib
import io
import logging
import math
import os
import re
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Mapping, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.common import (STATS, StageResult, fingerprint, is_complete, local_files, mark_success, publish,
                              read_json, resolve_files, staging_path, write_json)
from pipelines.config import MlflowConfig, Number, RayConfig, dataclass_from
from pipelines.tracking import config_hash

log = logging.getLogger(__name__)


@dataclass
class DownloadConfig:
    """The download stage's config; conf/data/download.yaml documents every key. Checked on construction: a
    ValueError names the key that is wrong."""

    CONFIG_NAME: ClassVar[str] = "download"
    REQUIRED: ClassVar[tuple] = ("input", "output")  # null or "": an error naming them (dataclass_from)
    input: Optional[str] = None  # the filter stage's output directory, or <download output>/failed.parquet
    output: Optional[str] = "outputs/data/download"
    url_col: str = "url"
    caption_col: Optional[str] = "caption"
    save_columns: Optional[list] = None  # null: every other column
    max_long_side: Optional[int] = None  # null: store the downloaded bytes; N: shrink images longer than N
    max_image_pixels: Optional[int] = 100_000_000  # with max_long_side: the decoding limit of images to shrink
    encode_format: str = "jpg"
    encode_quality: int = 95
    number_sample_per_shard: int = 1000
    timeout: Number = 10
    retries: int = 1
    processes_count: int = 2
    thread_count: int = 32
    distributor: str = "multiprocessing"  # multiprocessing (one machine) | ray (a cluster)
    retry_failed: bool = False
    user_agent_token: Optional[str] = None
    ray: RayConfig = field(default_factory=RayConfig)  # the ray distributor's cluster
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="infgen-data"))

    def __post_init__(self) -> None:
        if self.distributor not in ("multiprocessing", "ray"):
            raise ValueError(f"download config: distributor={self.distributor!r}; use multiprocessing or ray")
        if self.save_columns is not None and not isinstance(self.save_columns, (list, tuple)):
            raise ValueError(f"download config: save_columns={self.save_columns!r} must be a list or null")
        if self.encode_format not in ENCODINGS:
            raise ValueError(f"download config: encode_format={self.encode_format!r}; use one of {list(ENCODINGS)}")
        if self.max_long_side is not None and self.max_long_side < 1:
            raise ValueError(f"download config: max_long_side={self.max_long_side!r} must be >= 1 or null")


# the parameters that decide what lands in the shards: they (and the input files) name the output directory;
# timeouts, retries and parallelism do not, so a retry with a longer timeout continues the same output
SHAPE_KEYS = ("url_col", "caption_col", "save_columns", "max_long_side", "max_image_pixels", "encode_format",
              "encode_quality", "number_sample_per_shard")
# encode_format → (Pillow format, its quality option) for images ShrinkResizer re-encodes (img2dataset's choices)
ENCODINGS = {"jpg": ("JPEG", "quality"), "png": ("PNG", "compress_level"), "webp": ("WEBP", "quality")}
# img2dataset writes these itself and refuses them in save_additional_columns
RESERVED = {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
            "error_message", "exif", "md5", "sha256", "sha512"}
OWN = {"row_id", "error_kind", "error_message", "status", "attempts"}  # this stage's bookkeeping columns
FAILED = "failed.parquet"
SHARD_STATS = re.compile(r"^(\d+)_stats\.json$")

# img2dataset's per-row error_message → kind; first match wins (messages seen are in tests/test_download.py)
ERROR_KINDS = [
    ("http_", re.compile(r"HTTP Error (\d{3})")),  # urllib HTTPError: "HTTP Error 404: File not found"
    ("timeout", re.compile(r"timed out|timeout", re.I)),
    ("invalid_url", re.compile(r"unknown url type|no host given|URL can't contain|Invalid URL", re.I)),
    ("ssl", re.compile(r"SSL|CERTIFICATE", re.I)),
    ("connection", re.compile(r"urlopen error|Connection|Remote end closed|IncompleteRead|Name or service|"
                              r"getaddrinfo|Errno", re.I)),
    ("disallowed", re.compile(r"X-Robots-Tag")),  # the site opted out of AI use (noai, noimageai, ...)
    ("hash_mismatch", re.compile(r"hash mismatch")),
    ("", re.compile(r"^image refused: (\w+)")),  # ShrinkResizer: the encode stage's skip reason
]


def classify_error(message: Optional[str]) -> str:
    """One of http_<code>, timeout, invalid_url, ssl, connection, disallowed, hash_mismatch, other, or (with
    max_long_side) the encode stage's skip reason of an image that could not be shrunk (decompression_bomb,
    corrupt, unsupported_mode, unsupported_format, error_<exception>)."""
    message = message or ""
    for kind, pattern in ERROR_KINDS:
        match = pattern.search(message)
        if match:
            return kind + match.group(1) if match.groups() else kind
    return "other"


def resize_options(max_long_side: Optional[int]) -> dict[str, Any]:
    """img2dataset's resize options: store the downloaded bytes, or (ShrinkResizer) shrink only the images whose
    long side exceeds the cap."""
    if max_long_side is None:
        # the resizer returns the bytes as they came: nothing decoded (a "no" resize still decodes and re-encodes
        # every non-JPEG with OpenCV, and skip_reencode keeps only JPEG bytes)
        return {"resize_mode": "no", "disable_all_reencoding": True}
    # what ShrinkResizer reads (image_size: the long side's cap); the mode says the same to a reader of the call
    return {"resize_mode": "keep_ratio_largest", "resize_only_if_bigger": True, "image_size": int(max_long_side)}


class ShrinkResizer:
    """img2dataset's resizer when `max_long_side` is set; img2dataset builds it with its Resizer's keywords.

    img2dataset's own Resizer decodes with OpenCV, which saturates 16-bit and float images to white or black and
    ignores EXIF orientation. This one reads the size from the header and stores every image whose long side
    fits as downloaded (undecoded, whatever its format); a longer one is decoded as every stage decodes
    (pipelines.encode.decode_image: infgen.images.to_rgb under the pixel limit), shrunk to the cap with area
    averaging (img2dataset's "area") and encoded in encode_format. A longer image that cannot be decoded fails,
    with the error message `image refused: <the encode stage's skip reason>`.
    """

    def __init__(self, image_size: int, encode_format: str = "jpg", encode_quality: int = 95,
                 max_image_area: float = float("inf"), **_img2dataset_options: Any) -> None:
        if encode_format not in ENCODINGS:
            raise ValueError(f"encode_format={encode_format!r}; use one of {list(ENCODINGS)}")
        self.max_long_side = int(image_size)
        self.encode_format, self.encode_quality = encode_format, int(encode_quality)
        self.max_pixels = None if math.isinf(max_image_area) else int(max_image_area)

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple:
        """img2dataset's resizer protocol: the downloaded bytes → (stored bytes, width, height, original width,
        original height, error message); the sizes are None for bytes stored as downloaded."""
        from PIL import Image

        from pipelines.encode import SkipSample, decode_image  # in the download worker, only when shrinking

        data = img_stream.read()
        if not self._longer_than_cap(data):
            return data, None, None, None, None, None
        try:
            image = decode_image(data, self.max_pixels)
            if max(image.size) <= self.max_long_side:  # the header was misread (see _longer_than_cap): keep it
                return data, None, None, None, None, None
            scale = self.max_long_side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            fmt, option = ENCODINGS[self.encode_format]
            buffer = io.BytesIO()
            image.resize(size, Image.BOX).save(buffer, format=fmt, **{option: self.encode_quality})
        except SkipSample as e:
            return None, None, None, None, None, f"image refused: {e.reason}"
        except Exception as e:  # one bad image is one counted failure, never a lost row
            return None, None, None, None, None, f"image refused: error_{type(e).__name__}: {e}"
        return buffer.getvalue(), size[0], size[1], image.width, image.height, None

    def _longer_than_cap(self, data: bytes) -> bool:
        """Whether the header says the long side exceeds the cap (the same before and after EXIF rotation)."""
        from PIL import Image

        try:
            return max(Image.open(io.BytesIO(data)).size) > self.max_long_side
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            # over PIL's process-wide limit, which another thread may have lowered: decode_image decides
            return True
        except Exception:  # not an image Pillow knows: stored as downloaded, for the encode stage to count
            return False


def run_download(config: DownloadConfig | Mapping[str, Any]) -> StageResult:
    """Download (or continue, or retry the failures of) one output; see the module docstring. `config`: a
    DownloadConfig, or a mapping checked into one (ValueError naming the key)."""
    cfg = dataclass_from(DownloadConfig, config)
    # before img2dataset (and cv2, albumentations) are imported here or in the spawned workers
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("WANDB_SILENT", "true")
    out = _locate(cfg)
    retry = cfg.retry_failed or out.from_failed
    if is_complete(out.fs, out.root) and not retry:
        log.info("download output %s is complete: nothing to do", out.uri)
        return StageResult(out.uri, read_json(out.fs, f"{out.root}/{STATS}"), skipped=True)

    tags = {"infgen.stage": "download", "infgen.input": out.input, "infgen.output": out.uri,
            "infgen.fingerprint": out.fp, "infgen.config_hash": config_hash(out.params)}
    with cfg.mlflow.tracker("download", tags=tags) as tracker:
        tracker.log_params({k: v for k, v in asdict(cfg).items() if k != "mlflow"})
        start = time.time()
        if out.fs.get_file_info(out.path("_input", "_PREPARED")).type != pafs.FileType.File:
            _prepare(out)
        pending_round = bool(_rounds(out)) and not is_complete(out.fs, out.root)
        if not is_complete(out.fs, out.root):  # first run, or continuing a killed one (main pass or a round)
            _download(out, cfg)
            stats = _finish(out)
        else:
            stats = read_json(out.fs, f"{out.root}/{STATS}")
        if retry and not pending_round:  # a killed retry round that just finished was the retry asked for
            if stats["failed"] == 0:
                log.info("%s: no failed rows to retry", out.uri)
            else:
                _start_round(out)
                _download(out, cfg)
                stats = _finish(out)
        tracker.log_metrics({"rows": stats["rows"], "success": stats["success"], "failed": stats["failed"],
                             "duration_s": time.time() - start,
                             **{f"failures.{k}": v for k, v in stats["failures"].items()}})
        tracker.log_dict(stats, "download_stats.json")
        failures = ", ".join(f"{k} {v}" for k, v in stats["failures"].items() if v) or "none"
        tracker.set_note(f"{stats['success']} of {stats['rows']} images downloaded into {out.uri}; failed: "
                         f"{failures} (rows in failed.parquet; rerun with retry_failed=true).")
        with local_files(out.fs, [f"{out.root}/{FAILED}"]) as (path,):
            tracker.log_artifact(path)
        return StageResult(out.uri, stats, run_id=tracker.run_id)


# ---- configuration and location -----------------------------------------------------------------------------

@dataclass
class _Output:
    """One download output: its pyarrow filesystem + path, the URI img2dataset (fsspec) gets, and its inputs."""

    fs: pafs.FileSystem
    root: str
    uri: str
    fp: str
    params: dict  # the SHAPE_KEYS values (save_columns resolved)
    input: str  # the input spec the output was made from
    from_failed: bool = False  # located through <root>/failed.parquet given as input
    in_fs: Optional[pafs.FileSystem] = None
    files: list[str] = field(default_factory=list)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])


def _locate(cfg: DownloadConfig) -> _Output:
    spec = cfg.input
    in_fs, files = resolve_files(spec)
    if len(files) == 1 and os.path.basename(files[0]) == FAILED:  # fed back: retry into the output it came from
        root = os.path.dirname(files[0])
        stats_path = f"{root}/{STATS}"
        if in_fs.get_file_info(stats_path).type == pafs.FileType.File:
            stats = read_json(in_fs, stats_path)
            if stats.get("stage") == "download":
                uri = root if "://" not in spec else spec.rsplit("/", 1)[0]
                return _Output(in_fs, root, uri, stats["fingerprint"], stats["params"], stats["input"],
                               from_failed=True)
    _require_success(in_fs, spec, files)
    params = {k: getattr(cfg, k) for k in SHAPE_KEYS}
    params["save_columns"] = _save_columns(in_fs, files, cfg)
    fp = fingerprint(in_fs, files, params)
    output = cfg.output.rstrip("/")
    if "://" in output:
        fs, base = pafs.FileSystem.from_uri(output)
        return _Output(fs, f"{base}/{fp}", f"{output}/{fp}", fp, params, spec, in_fs=in_fs, files=files)
    root = os.path.join(os.path.abspath(output), fp)
    return _Output(pafs.LocalFileSystem(), root, root, fp, params, spec, in_fs=in_fs, files=files)


def _require_success(fs: pafs.FileSystem, spec: str, files: list[str]) -> None:
    """Only a finished filter output may be read: its directory (or each file's directory) has _SUCCESS."""
    info = fs.get_file_info(spec.split("://", 1)[-1] if "://" in spec else os.path.abspath(spec))
    dirs = [info.path] if info.type == pafs.FileType.Directory else sorted({os.path.dirname(f) for f in files})
    for d in dirs:
        if fs.get_file_info(f"{d}/_SUCCESS").type != pafs.FileType.File:
            raise ValueError(f"input {spec!r}: {d} has no _SUCCESS marker: the filter stage has not finished "
                             f"writing it (rerun the filter stage, or point input at a finished output)")


def _save_columns(fs: pafs.FileSystem, files: list[str], cfg: DownloadConfig) -> list[str]:
    """The metadata columns to keep: as configured, or every column but url/caption/bookkeeping/pandas index."""
    url_col, caption_col = cfg.url_col, cfg.caption_col
    schemas = {f: pq.read_schema(f, filesystem=fs) for f in files}
    for f, schema in schemas.items():
        for name, role in ((url_col, "url_col"), (caption_col, "caption_col")):
            if name is not None and name not in schema.names:
                raise ValueError(f"input {f}: no column {name!r} ({role}); columns are {schema.names}")
    if cfg.save_columns is not None:
        wanted = list(cfg.save_columns)
    else:
        first = schemas[files[0]].names
        wanted = [c for c in first if c not in (url_col, caption_col) and c not in OWN and not c.startswith("__")]
    for f, schema in schemas.items():
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise ValueError(f"input {f}: no column(s) {missing} of save_columns; columns are {schema.names}")
    stored = [_stored_name(c) for c in wanted]
    clash = sorted({c for c in stored if stored.count(c) > 1} | (set(wanted) & OWN))
    if clash:
        raise ValueError(f"input {files[0]}: save_columns {wanted} clash on {clash} (this stage writes row_id, "
                         f"error_kind, error_message, attempts; width/height are stored as src_width/src_height)")
    return wanted


def _stored_name(column: str) -> str:
    """The name a metadata column gets in the shards: img2dataset's reserved names get a src_ prefix."""
    return f"src_{column}" if column in RESERVED else column


def _columns(params: dict) -> tuple[list[str], list[str]]:
    """The columns of _input/ files: (url, caption if any, row_id), (stored metadata names)."""
    head = ["url"] + (["caption"] if params["caption_col"] else []) + ["row_id"]
    return head, [_stored_name(c) for c in params["save_columns"]]


# ---- the work -------------------------------------------------------------------------------------------------

def _prepare(out: _Output) -> None:
    """Copy the input rows into _input/ with canonical url/caption names and a global row_id."""
    cfg = out.params
    url_col, caption_col = cfg["url_col"], cfg["caption_col"]
    out.fs.create_dir(out.path("_input"))
    offset = 0
    for i, f in enumerate(out.files):
        columns = [url_col] + ([caption_col] if caption_col else []) + list(cfg["save_columns"])
        table = pq.read_table(f, columns=list(dict.fromkeys(columns)), filesystem=out.in_fs)
        data = {"url": table[url_col].cast(pa.string())}
        if caption_col:
            data["caption"] = table[caption_col].cast(pa.string())
        data["row_id"] = pa.array(range(offset, offset + table.num_rows), pa.int64())
        data.update({_stored_name(c): table[c] for c in cfg["save_columns"]})
        _write_parquet(out.fs, out.path("_input", f"main-{i:05d}.parquet"), pa.table(data))
        offset += table.num_rows
    with out.fs.open_output_stream(out.path("_input", "_PREPARED")) as stream:
        stream.write(b"")


def _rounds(out: _Output) -> list[str]:
    """Names of the retry-round input files, in order."""
    return [n for n in _input_names(out) if n.startswith("retry-")]


def _start_round(out: _Output) -> None:
    """A new round's input: the current failures, in the canonical columns of the main input files."""
    head, meta = _columns(out.params)
    failed = pq.read_table(out.path(FAILED), filesystem=out.fs)
    table = failed.select(head + out.params["save_columns"]).rename_columns(head + meta)
    name = f"retry-{len(_rounds(out)) + 1:03d}.parquet"
    # first: the output is changing until this round is done (and a kill between the two steps must not leave
    # a complete-looking output with an unprocessed round, whose rows a later round would download again)
    out.fs.delete_file(out.path("_SUCCESS"))
    _write_parquet(out.fs, out.path("_input", name), table)
    log.info("%s: retrying %d failed rows as %s", out.uri, table.num_rows, name)


def _download(out: _Output, cfg: DownloadConfig) -> None:
    """One img2dataset call over everything in _input/; shards already done are skipped."""
    import img2dataset  # heavy (cv2, albumentations, wandb): imported only when downloading

    params = out.params
    save = ["row_id"] + [_stored_name(c) for c in params["save_columns"]]
    if cfg.distributor == "ray":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        cfg.ray.init()
    previous = signal.getsignal(signal.SIGINT)  # img2dataset installs its own SIGINT handler: restore ours after
    main = importlib.import_module("img2dataset.main")  # the module (the package's `main` is its CLI function)
    stock = main.Resizer
    if params["max_long_side"] is not None:
        main.Resizer = ShrinkResizer  # download() builds its resizer from this name; the workers get the instance
    try:
        img2dataset.download(
            url_list=f"{out.uri}/_input", input_format="parquet", url_col="url",
            caption_col="caption" if params["caption_col"] else None, save_additional_columns=save,
            output_folder=f"{out.uri}/shards", output_format="webdataset", incremental_mode="incremental",
            number_sample_per_shard=params["number_sample_per_shard"], encode_format=params["encode_format"],
            encode_quality=params["encode_quality"], max_image_area=float(params["max_image_pixels"] or "inf"),
            **resize_options(params["max_long_side"]), timeout=cfg.timeout, retries=cfg.retries,
            processes_count=cfg.processes_count, thread_count=cfg.thread_count, distributor=cfg.distributor,
            user_agent_token=cfg.user_agent_token, compute_hash="sha256", enable_wandb=False)
    finally:
        main.Resizer = stock
        if signal.getsignal(signal.SIGINT) is not previous:
            signal.signal(signal.SIGINT, previous)


def _layout(out: _Output) -> list[tuple[str, int, range]]:
    """(input file, rows, shard ids) in img2dataset's order: files sorted, shard ids numbered on across files."""
    nsps = out.params["number_sample_per_shard"]
    layout, first = [], 0
    for name in _input_names(out):
        rows = pq.read_metadata(out.path("_input", name), filesystem=out.fs).num_rows
        count = math.ceil(rows / nsps)
        layout.append((name, rows, range(first, first + count)))
        first += count
    return layout


def _done_shards(out: _Output) -> set[int]:
    infos = out.fs.get_file_info(pafs.FileSelector(out.path("shards"), allow_not_found=True))
    return {int(m.group(1)) for i in infos if (m := SHARD_STATS.match(os.path.basename(i.path)))}


def _finish(out: _Output) -> dict:
    """Check every shard is done, merge all rounds by row_id, write failed.parquet, _stats.json and _SUCCESS."""
    import pandas as pd

    layout, done = _layout(out), _done_shards(out)
    expected = sorted(s for _, _, shards in layout for s in shards)
    unfinished = sorted(set(expected) - done)
    if unfinished:
        raise RuntimeError(f"download {out.uri}: {len(unfinished)} of {len(expected)} shards unfinished "
                           f"(ids {unfinished[:10]}{' ...' if len(unfinished) > 10 else ''}); "
                           f"rerun the same command to continue")
    # one record per row per attempt: (row_id, status, error_message, shard)
    columns = ["row_id", "status", "error_message"]
    rec = pd.concat([pq.read_table(out.path("shards", f"{s:05d}.parquet"), columns=columns, filesystem=out.fs)
                     .to_pandas().assign(shard=s) for s in expected] or [pd.DataFrame(columns=columns + ["shard"])])
    main_ids = pd.concat([pq.read_table(out.path("_input", n), columns=["row_id"], filesystem=out.fs).to_pandas()
                          for n, _, _ in layout if n.startswith("main-")] or [pd.DataFrame(columns=["row_id"])]).row_id
    ok = rec[rec.status == "success"]
    duplicates = int(ok.row_id.duplicated().sum())
    if duplicates:  # cannot happen with rounds built from failed.parquet; said loudly if it ever does
        log.warning("download %s: %d rows have more than one image in the shards", out.uri, duplicates)
    bad = rec[~rec.row_id.isin(ok.row_id)]
    attempts = bad.groupby("row_id").size().to_dict()
    last = bad.sort_values("shard", kind="stable").drop_duplicates("row_id", keep="last")  # the latest attempt
    missing = main_ids[~main_ids.isin(ok.row_id) & ~main_ids.isin(last.row_id)].tolist()

    failed = _failed_table(out, last, attempts, missing)
    _write_parquet(out.fs, out.path(FAILED), failed)
    kinds = failed.column("error_kind").to_pandas().value_counts().sort_index()
    examples = dict(zip(failed.column("error_kind").to_pylist(), failed.column("error_message").to_pylist()))
    rounds = [{"input": name, "rows": rows, "shards": len(shards),
               "success": int(ok.shard.isin(list(shards)).sum())}
              for name, rows, shards in layout if name.startswith("retry-")]
    stats = {"stage": "download", "input": out.input, "fingerprint": out.fp, "params": out.params,
             "rows": len(main_ids), "success": int(ok.row_id.nunique()), "failed": failed.num_rows,
             "failures": {k: int(v) for k, v in kinds.items()}, "failure_examples": examples,
             "duplicates": duplicates, "shards": [f"shards/{s:05d}.tar" for s in expected], "rounds": rounds,
             "input_files": {name: rows for name, rows, _ in layout}}
    if stats["rows"] != stats["success"] + sum(stats["failures"].values()):  # every row is counted exactly once
        raise RuntimeError(f"download {out.uri}: counts do not add up: {stats}")
    write_json(out.fs, out.path(STATS), stats)
    mark_success(out.fs, out.root)
    log.info("download %s: %d of %d rows downloaded, failures %s", out.uri, stats["success"], stats["rows"],
             stats["failures"])
    return stats


def _failed_table(out: _Output, last, attempts: dict, missing: list[int]) -> pa.Table:
    """The failed rows with their input metadata (under the input's own column names), error kind and message."""
    head, meta = _columns(out.params)
    canonical = head + meta
    parts = []
    for shard, group in last.groupby("shard"):
        t = pq.read_table(out.path("shards", f"{shard:05d}.parquet"), columns=canonical + ["error_message"],
                          filesystem=out.fs)
        ids = pa.array(group.row_id.tolist(), pa.int64())
        parts.append(t.filter(pc.is_in(t.column("row_id"), value_set=ids)))
    no_record = "no record in any shard"
    if missing:  # rows img2dataset wrote no record for (a sample whose handling raised inside its loop)
        for name in _input_names(out):
            if name.startswith("main-"):
                t = pq.read_table(out.path("_input", name), columns=canonical, filesystem=out.fs)
                t = t.filter(pc.is_in(t.column("row_id"), value_set=pa.array(missing, pa.int64())))
                parts.append(t.append_column("error_message", pa.array([no_record] * t.num_rows, pa.string())))
    if not parts:  # no failures: an empty table, typed like the input
        schema = pq.read_schema(out.path("_input", _input_names(out)[0]), filesystem=out.fs)
        parts.append(schema.empty_table().select(canonical).append_column("error_message", pa.array([], pa.string())))
    table = pa.concat_tables(parts, promote_options="permissive").sort_by("row_id")
    kinds = ["missing" if m == no_record else classify_error(m) for m in table.column("error_message").to_pylist()]
    tries = [int(attempts.get(r, 0)) for r in table.column("row_id").to_pylist()]
    table = table.append_column("error_kind", pa.array(kinds, pa.string()))
    table = table.append_column("attempts", pa.array(tries, pa.int32()))
    extra = ["error_kind", "error_message", "attempts"]
    return table.select(head + extra + meta).rename_columns(head + extra + out.params["save_columns"])


def _input_names(out: _Output) -> list[str]:
    infos = out.fs.get_file_info(pafs.FileSelector(out.path("_input"), allow_not_found=True))
    return sorted(os.path.basename(i.path) for i in infos if i.path.endswith(".parquet"))


# ---- small helpers --------------------------------------------------------------------------------------------

def _write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Write atomically, so a killed run never leaves half a file (pipelines.common.staging_path)."""
    staged = staging_path(fs, path)
    pq.write_table(table, staged, filesystem=fs)
    publish(fs, staged, path)


