"""The encoded-shard format: what the encode stage writes and every later stage, the demo and the benchmarks read.

One parquet file per input .tar. Each row is one crop of one image:

  key                  str        the sample key (`<key>_<c>` with several crops per image)
  latent               float16    (C, h, w), a fixed-shape tensor column: scaled latents, as diffusion models make
  hr                   bytes      the crop at high resolution, encoded (PNG by default; see `encode_hr`)
  hr_width, hr_height  int32      its size in pixels
  crop_box             int32      (4,): left, top, right, bottom in the original image's pixels
  orig_width, orig_height  int32  the original image's size, after EXIF orientation
  caption, url         str        from img2dataset's .txt and .json (None when absent)

The encode stage writes the shard's counts into the footer last (`ShardWriter.commit`): a file without them is not
a complete shard. Fixed-shape tensors, not lists: Ray Data and `latents` turn the column into one (N, C, h, w) array
without decoding anything, and a reader can fetch latents without the image bytes.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from infgen.images import to_rgb
from pipelines.common import STATS, publish, read_json, staging_path

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

STATS_KEY = b"infgen.encode.shard_stats"  # the footer entry that holds a shard's counts
ROW_GROUP_BYTES = 64 * 2 ** 20  # buffer this much before writing a parquet row group (few, large groups)
HR_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}  # encode's hr_format → Pillow's format name
REQUIRED = ("key", "latent", "hr", "url")  # what a reader needs to call a file a shard


def schema(latent_shape: Sequence[int]) -> pa.Schema:
    """The shard schema for latents of `latent_shape` (C, h, w)."""
    return pa.schema([
        ("key", pa.string()),
        ("latent", pa.fixed_shape_tensor(pa.float16(), tuple(latent_shape))),
        ("hr", pa.binary()),  # encoded; the format is in _stats.json (any reader can tell it from the bytes)
        ("hr_width", pa.int32()), ("hr_height", pa.int32()),
        ("crop_box", pa.fixed_shape_tensor(pa.int32(), (4,))),
        ("orig_width", pa.int32()), ("orig_height", pa.int32()),
        ("caption", pa.string()), ("url", pa.string()),
    ])


# ---- writing -------------------------------------------------------------------------------------------------


def encode_hr(image: Image.Image, hr_format: str = "png", quality: int = 95, png_compress_level: int = 1) -> bytes:
    """An RGB crop → the bytes of the `hr` column. `hr_format`: png (lossless), jpeg (4:4:4) or webp, with
    `quality` (jpeg and webp, 1-100) and `png_compress_level` (0-9). Raises KeyError for another format."""
    buffer = io.BytesIO()
    kind = HR_FORMATS[hr_format]
    if kind == "PNG":
        image.save(buffer, format=kind, compress_level=png_compress_level)
    elif kind == "JPEG":
        image.save(buffer, format=kind, quality=quality, subsampling=0)  # 4:4:4: keep chroma detail
    else:
        image.save(buffer, format=kind, quality=quality)
    return buffer.getvalue()


def to_table(columns: Mapping[str, Any], latent_shape: Sequence[int]) -> pa.Table:
    """Columns of N rows → a table in the shard schema. `latent`: an (N, C, h, w) float16 array; `crop_box`:
    (N, 4) int32; every other column of `schema` a sequence of N values. Raises pyarrow.ArrowInvalid (or
    ArrowTypeError) on a column of the wrong type or length."""
    n = len(columns["key"])
    latents = np.ascontiguousarray(columns["latent"], np.float16).reshape(n, *latent_shape)
    return pa.table({
        "key": pa.array(columns["key"], pa.string()),
        "latent": pa.FixedShapeTensorArray.from_numpy_ndarray(latents),
        "hr": pa.array(columns["hr"], pa.binary()),
        **{k: pa.array(columns[k], pa.int32()) for k in ("hr_width", "hr_height")},
        "crop_box": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(columns["crop_box"], np.int32)),
        **{k: pa.array(columns[k], pa.int32()) for k in ("orig_width", "orig_height")},
        **{k: pa.array(columns[k], pa.string()) for k in ("caption", "url")},
    }, schema=schema(latent_shape))


def write_shard(path: str, columns: Mapping[str, Any], latent_shape: Sequence[int]) -> None:
    """Write a whole shard at once from columns (`to_table`), locally and without counts in its footer: test and
    benchmark data that no encode run resumes."""
    pq.write_table(to_table(columns, latent_shape), path)


class ShardWriter:
    """One output shard of the encode stage, streamed in row groups; `commit` writes the counts into the footer,
    which is the completion marker (a file without them is not a shard: `shard_is_complete`).

    On a local or shared POSIX filesystem the shard is written under a temporary name and renamed (atomic). On an
    object store it is written in place: the upload becomes visible only when the stream closes, and a rename
    there is a copy (S3's CopyObject refuses objects over 5 GB).
    """

    def __init__(self, fs: pafs.FileSystem, path: str, latent_shape: Sequence[int]) -> None:
        self.fs, self.path, self.latent_shape = fs, path, tuple(latent_shape)
        self.tmp = staging_path(fs, path)
        self.sink = fs.open_output_stream(self.tmp)
        self.writer = pq.ParquetWriter(self.sink, schema(self.latent_shape))
        self.counts: Counter = Counter()
        self.buffer: list[pa.Table] = []
        self.buffered = 0

    def add(self, rows: Mapping[str, np.ndarray]) -> None:
        """Rows as the encode stage's VAE step returns them: the schema's columns (latents as float16 bytes) plus
        `crop` (0 on a sample's first crop: counted as an image in) and `skip_reason` ('' for an encoded row, else
        the reason it is counted under and not written)."""
        reasons = rows["skip_reason"]
        self.counts["images_in"] += int((rows["crop"] == 0).sum())  # samples; `encoded` counts crops
        self.counts.update(f"skipped.{r}" for r in reasons if r)
        keep = np.flatnonzero(reasons == "")
        if not len(keep):
            return
        columns = {k: rows[k][keep] for k in schema(self.latent_shape).names}
        columns["latent"] = np.stack([np.frombuffer(b, np.float16) for b in columns["latent"]])
        table = to_table(columns, self.latent_shape)
        self.counts["encoded"] += len(keep)
        self.buffer.append(table)
        self.buffered += table.nbytes
        if self.buffered >= ROW_GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.concat_tables(self.buffer))
        self.buffer, self.buffered = [], 0

    def commit(self) -> dict:
        """Write what is buffered and the counts, close, publish; returns the counts (`shard_stats`)."""
        self.flush()
        stats = shard_stats(self.counts)
        self.writer.add_key_value_metadata({STATS_KEY: json.dumps(stats)})
        self.writer.close()
        self.sink.close()
        publish(self.fs, self.tmp, self.path)  # where it is a rename, the rename is the commit
        return stats

    def abort(self) -> None:
        """After a failure: remove what was written. (An object-store upload cannot be cancelled from pyarrow;
        whatever it leaves has no counts in its footer, and the rerun rewrites it.)"""
        try:
            self.sink.close()
            self.fs.delete_file(self.tmp)
        except OSError as e:
            log.warning("encode: could not remove the partial shard %s: %s", self.tmp, e)


def shard_stats(counts: Mapping[str, int]) -> dict:
    """Counts ({images_in, encoded, skipped.<reason>}) → {"images_in", "encoded", "skipped": {reason: n}}."""
    skipped = {k.split(".", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("skipped.")}
    return {"images_in": counts.get("images_in", 0), "encoded": counts.get("encoded", 0), "skipped": skipped}


def read_shard_stats(fs: pafs.FileSystem, path: str) -> dict:
    """The counts in a shard's footer (`shard_stats`). Raises ValueError when there are none (not a complete
    shard), OSError or pyarrow.ArrowInvalid when the file is missing or not parquet."""
    with fs.open_input_file(path) as f:
        metadata = pq.read_metadata(f).metadata or {}
    if STATS_KEY not in metadata:
        raise ValueError(f"{path}: not an encode output shard (no {STATS_KEY.decode()} in its footer)")
    return json.loads(metadata[STATS_KEY])


def shard_is_complete(fs: pafs.FileSystem, path: str) -> bool:
    """The shard exists and its footer holds its counts (written last, by ShardWriter.commit)."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    try:
        read_shard_stats(fs, path)
    except (ValueError, OSError, pa.ArrowInvalid):
        return False
    return True


# ---- reading -------------------------------------------------------------------------------------------------


def read_rows(fs: pafs.FileSystem, paths: Sequence[str], columns: Optional[Sequence[str]] = None,
              keys: Optional[Iterable[str]] = None, exclude: Iterable[str] = ()) -> pa.Table:
    """The rows of `paths` in file order, `columns` of them (default: all): only those whose key is in `keys`
    (when given) and not in `exclude`. Raises OSError / pyarrow.ArrowInvalid on a missing or unreadable file,
    KeyError on an unknown column."""
    wanted = None if keys is None else pa.array(list(keys), pa.string())
    unwanted = pa.array(list(exclude), pa.string())
    filtered = wanted is not None or len(unwanted)
    read = None if columns is None else list(dict.fromkeys([*columns, *(["key"] if filtered else [])]))
    tables = []
    for path in paths:
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=read)
        if wanted is not None:
            table = table.filter(pc.is_in(table.column("key"), value_set=wanted))
        if len(unwanted):
            table = table.filter(pc.invert(pc.is_in(table.column("key"), value_set=unwanted)))
        tables.append(table if columns is None else table.select(list(columns)))
    return pa.concat_tables(tables)


def row_group_keys(fs: pafs.FileSystem, path: str, name: Optional[str] = None) -> list[list[tuple[str, Optional[int]]]]:
    """(key, long side of its hr crop in pixels) of each row of each row group of the shard at `path` (reads
    only those columns; the side is None in shards without hr_width/hr_height). Raises ValueError naming the
    file (`name`, default `path`) when it lacks a column of REQUIRED."""
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        names = set(parquet.schema_arrow.names)
        missing = set(REQUIRED) - names
        if missing:
            raise ValueError(f"{name or path}: not an encode-stage shard (missing columns {sorted(missing)})")
        sized = {"hr_width", "hr_height"} <= names
        groups = []
        for g in range(parquet.num_row_groups):
            table = parquet.read_row_group(g, columns=["key", "hr_width", "hr_height"] if sized else ["key"])
            keys = table.column("key").to_pylist()
            sides = (pc.max_element_wise(table.column("hr_width"), table.column("hr_height")).to_pylist() if sized
                     else [None] * len(keys))
            groups.append(list(zip(keys, sides)))
        return groups


def read_row_group(fs: pafs.FileSystem, path: str, group: int, columns: Sequence[str]) -> pa.Table:
    """`columns` of one row group (0-based; -1: the last) of the shard at `path`."""
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        return parquet.read_row_group(parquet.num_row_groups - 1 if group == -1 else group, columns=list(columns))


def last_rows(fs: pafs.FileSystem, paths: Sequence[str], count: int) -> tuple[list[str], np.ndarray, list[bytes]]:
    """The last `count` rows of the last shard (fewer when its last row group is shorter): (keys, latents
    (n, C, h, w) float32, encoded hr crops). Reads only the last row group: shards hold gigabytes of PNGs."""
    table = read_row_group(fs, paths[-1], -1, ["key", "latent", "hr"])
    table = table.slice(max(0, table.num_rows - count))
    return table.column("key").to_pylist(), latents(table), table.column("hr").to_pylist()


def key_urls(fs: pafs.FileSystem, paths: Sequence[str]) -> list[tuple[list[str], list[Optional[str]]]]:
    """Each shard's (keys, urls), in file order: what the train/evaluation split reads (reads only those two
    columns)."""
    files = []
    for path in paths:
        table = read_rows(fs, [path], ["key", "url"])
        files.append((table.column("key").to_pylist(), table.column("url").to_pylist()))
    return files


def recorded_latent_space(fs: pafs.FileSystem, paths: Sequence[str]) -> Optional[dict]:
    """What the encode stage recorded of these shards' latent space (its STATS file beside them): {"vae": the
    config's vae, "scaling_factor", "latent_shape"}; None when the shards are not one encode output's (several
    directories, no record, or one from before it was recorded)."""
    directories = {path.rsplit("/", 1)[0] for path in paths}
    if len(directories) != 1:
        return None
    path = f"{directories.pop()}/{STATS}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    stats = read_json(fs, path)
    return {k: stats[k] for k in ("vae", "scaling_factor", "latent_shape")} if "scaling_factor" in stats else None


def training_dataset(fs: pafs.FileSystem, paths: Sequence[str], exclude: Sequence[str]) -> "ray.data.Dataset":
    """A Ray dataset of the rows whose key is not in `exclude`, columns `latent` (numpy batches (B, C, h, w)
    float16) and `hr` (encoded crops), its block order shuffled anew every epoch."""
    import ray.data

    return (ray.data.read_parquet(list(paths), filesystem=fs, columns=["key", "latent", "hr"])
            .filter(expr=~ray.data.expressions.col("key").is_in(list(exclude)))
            .select_columns(["latent", "hr"])
            .randomize_block_order())


def tensor_column(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-shape tensor column (latent, crop_box) as one array (N, *shape) in its stored dtype."""
    return table.column(name).combine_chunks().to_numpy_ndarray()


def latents(table: pa.Table) -> np.ndarray:
    """The table's latents as (N, C, h, w) float32: what the models and the VAE take (stored as float16)."""
    return tensor_column(table, "latent").astype(np.float32)


def hr_image(data: bytes, at_least: Optional[tuple[int, int]] = None) -> Image.Image:
    """An `hr` value → the RGB crop (infgen.images.to_rgb, as every stage decodes). With `at_least` (H, W), a
    JPEG decodes at the smallest 1/2^k scale still at least that size (Pillow's draft mode: 4× fewer pixels per
    halving); other formats decode whole. Raises PIL.UnidentifiedImageError / OSError on bytes that are not an
    image, infgen.images.UnsupportedImage on an image mode no stage takes."""
    image = Image.open(io.BytesIO(data))
    if at_least is not None:
        image.draft("RGB", (at_least[1], at_least[0]))  # JPEG only (elsewhere a no-op)
    return to_rgb(image)
