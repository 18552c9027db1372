"""Stage 3: webdataset shards (img2dataset output) → frozen-VAE latents of random crops + the crops at high resolution.

Per sample: decode with PIL under a decompression-bomb limit (failures are skipped and counted by reason), take a
random crop seeded by the sample key (identical on every rerun), resize it to `input_size`² for the VAE and keep
it at high resolution (long side ≤ `hr_max_side`).

This stage is where images are judged: the download stage stores the bytes it downloaded without decoding them
(pipelines/download.py), under `key.jpg` whatever their format, so an image is decoded here by its content
(DECODED_FORMATS) with `infgen.images.to_rgb`, and an HTML page, a truncated or empty body, a decompression bomb
or an image under `min_side` is skipped here, counted as not_an_image, corrupt, empty, decompression_bomb,
too_small. Every stored sample is counted once: images_in = encoded + skipped (with crops_per_image 1).

Work is split BY SHARD: a Ray Data actor pool (ShardEncoder, one VAE load per actor, on GPU in fp16/bf16) takes one
input .tar at a time, streams it, decodes in a thread pool beside the VAE and writes that shard's output itself.
The driver holds only the plan (input → output paths) and the per-shard counts: no image or latent passes through
it, and shards finish in any order.

Output: one parquet file per input .tar (the format, its writer and its readers: pipelines/shards.py), under
`<output>/<fingerprint>/`, with the shard's counts in its footer, written last: that footer is the completion
marker. On a POSIX filesystem the file is written under a temporary name and renamed; on an object store it is
written in place (an upload is visible only once complete; a rename there would be a copy, refused over 5 GB). A
rerun skips shards that are complete, so a killed run finishes with no duplicates and nothing lost. Parquet, not
webdataset, because training reads this with Ray Data: the latent is a fixed-shape tensor column (float16) that Ray
turns into one (N, 4, h, w) array without decoding anything, and a reader can fetch latents without the image bytes.

The high-resolution crop is stored as PNG (lossless) by default: the input is already JPEG, and a second JPEG
generation adds new 8×8 block artefacts — on the latent's own 8× grid — that the decoder would learn to draw.
`png_compress_level` 1 is several times faster than PIL's default 6 for ~10% more bytes; this stage is CPU-bound.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import random
import time
import warnings
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Iterator, Mapping, Optional

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from infgen.data import random_crop_box
from infgen.images import UnsupportedImage, to_rgb
from pipelines import shards
from pipelines.common import (STATS, StageResult, fingerprint, is_complete, mark_success, output_root, output_uri,
                              read_json, resolve_files, uri, write_json)
from pipelines.config import MlflowConfig, Number, RayConfig, dataclass_from

log = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # webdataset member suffixes img2dataset can write
# image files that are not img2dataset's: present, but counted as unsupported_format rather than decoded
OTHER_IMAGE_MEMBERS = ("gif", "bmp", "tif", "tiff", "avif", "heic", "heif", "jxl", "jp2", "ico")
# what decode_image decodes, told by the bytes (the download stage stores originals under `key.jpg` whatever their
# format): the web's raster formats, those OpenCV decoded when img2dataset still did. Pillow opens more (EPS
# through Ghostscript, PSD, FITS, ...); untrusted bytes never reach those decoders: unsupported_format
DECODED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "JPEG2000", "PPM"})
DECODE_WORKER_BYTES = 768 * 2 ** 20  # a decode worker's own footprint (Python, PIL, torch imported)
PRECISIONS = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass
class EncodeMlflow(MlflowConfig):
    """The encode stage's `mlflow` section: `enabled: false` logs nothing (benchmarks, reruns in tests)."""

    enabled: bool = True


@dataclass
class EncodeConfig:
    """The encode stage's config; conf/data/encode.yaml documents every key. Checked on construction: a
    ValueError names the key that is wrong."""

    CONFIG_NAME: ClassVar[str] = "encode"
    REQUIRED: ClassVar[tuple] = ("input", "output")  # null or "": an error naming them (dataclass_from)
    input: Optional[str] = None  # .tar shards: a file, a directory, a glob, or a URI (s3://, gs://, ...)
    output: Optional[str] = None  # the stage writes <output>/<fingerprint>/
    vae: str = "tiny"  # a hub id, a local diffusers directory, or "tiny"
    vae_subfolder: Optional[str] = None
    seed: int = 0
    input_size: int = 512  # the VAE sees the crop at input_size²: latents are input_size/8 per side
    min_side: int = 512  # shorter image side below this → skipped as too_small; also the smallest crop side
    aspect_range: tuple = (1.0, 1.0)  # crop width/height, drawn per sample
    crops_per_image: int = 1  # k > 1: k crops per image, keyed <key>_0 … <key>_{k-1}, each seeded by its key
    hr_max_side: int = 2048  # the high-resolution crop is downscaled to this long side when larger
    hr_format: str = "png"  # png (lossless) | jpeg | webp
    hr_quality: int = 95  # jpeg / webp only
    png_compress_level: int = 1
    max_image_pixels: int = 100_000_000  # larger images are decompression bombs (PIL's warning is an error too)
    batch_size: int = 16
    num_actors: int = 1
    cpus_per_actor: Number = 1.0
    num_gpus: Number = 0.0  # per actor; > 0 runs the VAE on CUDA in `precision`
    precision: str = "fp16"  # on GPU: fp16 | bf16 | fp32; on CPU always fp32
    torch_threads: Optional[int] = None  # per actor; default: its CPUs
    decode_threads: Optional[int] = None  # per actor, decoding and cropping beside the VAE; default: its CPUs
    ray: RayConfig = field(default_factory=RayConfig)
    grid_samples: int = 4  # crops next to their VAE decode, logged to MLflow (0: none)
    mlflow: EncodeMlflow = field(default_factory=lambda: EncodeMlflow(experiment="infgen-data"))

    def __post_init__(self) -> None:
        self.aspect_range = tuple(float(a) for a in self.aspect_range)

        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"encode config: {key}={getattr(self, key)!r} {why}")

        if self.input_size <= 0 or self.input_size % 8:
            raise bad("input_size", "must be a positive multiple of 8")
        if self.min_side < 1:
            raise bad("min_side", "must be >= 1")
        if len(self.aspect_range) != 2 or not 0 < self.aspect_range[0] <= self.aspect_range[1]:
            raise bad("aspect_range", "must be [low, high] with 0 < low <= high")
        if self.hr_max_side < self.min_side:
            raise bad("hr_max_side", f"must be >= min_side ({self.min_side})")
        if self.hr_format not in shards.HR_FORMATS:
            raise bad("hr_format", f"must be one of {sorted(shards.HR_FORMATS)}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"must be one of {sorted(PRECISIONS)}")
        for key in ("batch_size", "num_actors", "max_image_pixels", "crops_per_image"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        for key in ("torch_threads", "decode_threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        if self.num_gpus < 0 or self.cpus_per_actor <= 0:
            raise bad("num_gpus" if self.num_gpus < 0 else "cpus_per_actor", "is out of range")

    def output_params(self, vae_source: str) -> dict:
        """What shapes the output (and so the fingerprint); not batch sizes, actor counts or tracking."""
        keys = ("vae_subfolder", "seed", "input_size", "min_side", "aspect_range", "crops_per_image", "hr_max_side",
                "hr_format", "hr_quality", "png_compress_level", "max_image_pixels")
        # the tiny VAE's cache directory is named by a hash of its config: a refitted one gets a new output
        vae = f"tiny:{os.path.basename(vae_source)}" if self.vae == "tiny" else self.vae
        return {**{k: getattr(self, k) for k in keys}, "vae": vae, "vae_dtype": self.vae_dtype}

    @property
    def decode_thread_count(self) -> int:
        """Threads per actor that decode and crop beside the VAE: `decode_threads`, else one per whole CPU."""
        return self.decode_threads or max(1, math.floor(self.cpus_per_actor))

    @property
    def vae_dtype(self) -> str:
        return PRECISIONS[self.precision] if self.num_gpus > 0 else "float32"


# ---- per sample: decode, crop, resize (CPU tasks) ----------------------------------------------------------


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the name it is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(data: Optional[bytes], max_pixels: Optional[int]) -> Image.Image:
    """Encoded bytes → a fully loaded RGB image (`infgen.images.to_rgb`, as every stage decodes), or
    SkipSample(reason). The format is read from the bytes, never from a file name; `max_pixels` None: no limit."""
    if data is None:
        raise SkipSample("missing_image")
    if len(data) == 0:
        raise SkipSample("empty")
    previous = Image.MAX_IMAGE_PIXELS  # PIL's limit is a module global: set it for this call only
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns up to 2× the limit
            image = Image.open(io.BytesIO(data))  # the header only
            if image.format not in DECODED_FORMATS:
                raise SkipSample("unsupported_format")
            # checked here too: PIL's limit and the warnings filters are process-wide, so threads decoding at once
            # (img2dataset's, encode's) can run under another call's setting; this check sees only its own
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise SkipSample("decompression_bomb")
            image.load()
            return to_rgb(image)
    except UnsupportedImage as e:
        raise SkipSample(e.reason) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SkipSample("decompression_bomb") from None
    except UnidentifiedImageError:
        raise SkipSample("not_an_image") from None
    except ValueError as e:
        # PNG text/ICC chunks that inflate past PIL's limits are bombs too
        bomb = "decompressed data too large" in str(e).lower()
        raise SkipSample("decompression_bomb" if bomb else "corrupt") from None
    except (OSError, SyntaxError, EOFError, IndexError, TypeError):  # truncated / damaged streams
        raise SkipSample("corrupt") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def sample_rng(key: str, seed: int) -> random.Random:
    """A generator seeded by the sample key: the same crop on every run, however the data is batched."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def crop_box_for(key: str, width: int, height: int, cfg: EncodeConfig) -> tuple[int, int, int, int]:
    """The sample's crop (left, top, right, bottom): short side >= min_side, width/height in aspect_range."""
    if min(width, height) < cfg.min_side:
        raise SkipSample("too_small")
    # aspects a crop with short side >= min_side can have in this image, with a hair of slack for rounding
    low = max(cfg.aspect_range[0], cfg.min_side / height * (1 + 1e-6))
    high = min(cfg.aspect_range[1], width / cfg.min_side * (1 - 1e-6))
    if cfg.aspect_range[0] == cfg.aspect_range[1] and low <= high:
        low = high = cfg.aspect_range[0]
    if low > high:
        raise SkipSample("no_crop_in_aspect_range")
    try:
        return random_crop_box(width, height, sample_rng(key, cfg.seed), cfg.min_side, (low, high))
    except ValueError:
        raise SkipSample("no_crop_in_aspect_range") from None


def crop_keys(key: str, cfg: EncodeConfig) -> list[str]:
    """The output keys of one sample: its own key, or key_0 … key_{k-1} with crops_per_image = k > 1."""
    return [key] if cfg.crops_per_image == 1 else [f"{key}_{c}" for c in range(cfg.crops_per_image)]


def prepare_sample(key: str, data: Optional[bytes], cfg: EncodeConfig) -> dict:
    """One sample → the VAE input (raw uint8 input_size²×3 bytes), the encoded HR crop and the geometry."""
    return prepare_crop(key, decode_image(data, cfg.max_image_pixels), cfg)


def prepare_crop(key: str, image: Image.Image, cfg: EncodeConfig) -> dict:
    """The crop of a decoded image that `key` seeds → the VAE input, the encoded HR crop and the geometry."""
    width, height = image.size
    box = crop_box_for(key, width, height, cfg)
    crop = image.crop(box)
    vae_input = crop.resize((cfg.input_size, cfg.input_size), Image.BICUBIC)
    scale = cfg.hr_max_side / max(crop.size)
    if scale < 1:
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BICUBIC)
    hr = shards.encode_hr(crop, cfg.hr_format, cfg.hr_quality, cfg.png_compress_level)
    return {"pixels": np.asarray(vae_input, dtype=np.uint8).tobytes(), "hr": hr,
            "hr_width": crop.width, "hr_height": crop.height, "crop_box": box,
            "orig_width": width, "orig_height": height}


def _text(value: Any) -> Optional[str]:
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else None


def _url(meta: Any) -> Optional[str]:
    try:
        url = json.loads(meta).get("url") if isinstance(meta, (bytes, bytearray, str)) else None
    except (ValueError, AttributeError):
        return None
    return url if isinstance(url, str) else None


def prepare_batch(batch: dict[str, np.ndarray], cfg: EncodeConfig) -> dict[str, np.ndarray]:
    """A batch of read_webdataset rows (raw bytes) → prepared rows; failures get a skip_reason, not an error."""
    n = len(batch["__key__"])
    # a member is named by its suffix after the key (webdataset lower-cases it): "jpg", or a variant such as
    # "v2.jpg"; its last part says the format
    members = [batch[m] for m in sorted(batch, key=_member_rank) if _member_rank(m) < len(IMAGE_MEMBERS)]
    others = [batch[m] for m in batch if m.rsplit(".", 1)[-1] in OTHER_IMAGE_MEMBERS]
    out: dict[str, list] = {k: [] for k in ("key", "crop", "shard", "skip_reason", "pixels", "hr", "hr_width",
                                            "hr_height", "crop_box", "orig_width", "orig_height", "caption", "url")}
    empty = {"pixels": b"", "hr": b"", "hr_width": 0, "hr_height": 0, "crop_box": (0, 0, 0, 0),
             "orig_width": 0, "orig_height": 0}
    for i in range(n):
        key = str(batch["__key__"][i])
        data = next((m[i] for m in members if isinstance(m[i], (bytes, bytearray))), None)
        try:  # one row per crop; a sample that fails is one skipped row, whatever crops_per_image is
            if data is None and any(isinstance(m[i], (bytes, bytearray)) for m in others):
                raise SkipSample("unsupported_format")
            image = decode_image(data, cfg.max_image_pixels)
            rows = [(crop_key, prepare_crop(crop_key, image, cfg), "") for crop_key in crop_keys(key, cfg)]
        except SkipSample as e:
            rows = [(key, empty, e.reason)]
        except Exception as e:  # anything else is still one bad sample, not a dead stage: count it by name
            log.warning("sample %s in %s: %s: %s", key, batch["__url__"][i], type(e).__name__, e)
            rows = [(key, empty, f"error_{type(e).__name__}")]
        for crop, (row_key, row, reason) in enumerate(rows):
            out["key"].append(row_key)
            out["crop"].append(crop)
            out["shard"].append(str(batch["__url__"][i]))
            out["skip_reason"].append(reason)
            out["caption"].append(_text(batch["txt"][i]) if "txt" in batch else None)
            out["url"].append(_url(batch["json"][i]) if "json" in batch else None)
            for k, v in row.items():
                out[k].append(v)
    ints = ("crop", "hr_width", "hr_height", "orig_width", "orig_height")
    arrays = {k: _object_array(v) for k, v in out.items() if k not in ints and k != "crop_box"}
    arrays.update({k: np.array(out[k], dtype=np.int32) for k in ints})
    arrays["crop_box"] = np.array(out["crop_box"], dtype=np.int32).reshape(len(out["key"]), 4)
    return arrays


def _member_rank(name: str) -> int:
    """IMAGE_MEMBERS' order for the member name's last suffix ("v2.jpg" ranks as "jpg"); past them: not an
    image img2dataset writes."""
    ext = name.rsplit(".", 1)[-1]
    return IMAGE_MEMBERS.index(ext) if not name.startswith("__") and ext in IMAGE_MEMBERS else len(IMAGE_MEMBERS)


def _object_array(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)  # 1-D even when every bytes value has the same length
    array[:] = values
    return array


# ---- the VAE encoder (actors) --------------------------------------------------------------------------------


class EncodeUDF:
    """Loads the frozen VAE once per actor; encodes each batch's prepared crops into float16 latents (bytes)."""

    def __init__(self, vae: str, subfolder: Optional[str], input_size: int, num_gpus: float, precision: str,
                 threads: int) -> None:
        import torch

        from infgen.vae import load_vae

        torch.set_num_threads(max(1, threads))  # one actor per core share: no oversubscription with decode tasks
        if num_gpus > 0 and not torch.cuda.is_available():
            raise RuntimeError(f"num_gpus={num_gpus} but CUDA is not available on this actor")
        self.device = "cuda" if num_gpus > 0 else "cpu"
        dtype = getattr(torch, PRECISIONS[precision]) if self.device == "cuda" else torch.float32
        self.vae = load_vae(vae, subfolder=subfolder, dtype=dtype, device=self.device)
        self.input_size = input_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        pixels = batch.pop("pixels")
        reasons = np.array(batch["skip_reason"], dtype=object)  # a writable copy
        latents = np.full(len(pixels), b"", dtype=object)
        ok = [i for i, p in enumerate(pixels) if len(p)]
        if ok:
            s = self.input_size
            x = np.stack([np.frombuffer(pixels[i], np.uint8) for i in ok]).reshape(len(ok), s, s, 3)
            x = torch.from_numpy(x).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            z = self.vae.encode(x).cpu().numpy()
            with np.errstate(over="ignore"):
                z = z.astype(np.float16)
            finite = np.isfinite(z).reshape(len(ok), -1).all(axis=1)  # fp16 overflow or a NaN from the VAE
            for j, i in enumerate(ok):
                if finite[j]:
                    latents[i] = z[j].tobytes()
                else:
                    reasons[i] = "non_finite_latent"
        batch["latent"], batch["skip_reason"] = latents, reasons
        return batch


# ---- output shards (the format: pipelines.shards) -------------------------------------------------------


def shard_names(paths: list[str]) -> dict[str, str]:
    """Input .tar → output file name: its path below the inputs' common directory, '/' → '__', .parquet."""
    base = os.path.commonpath([os.path.dirname(p) for p in paths]) if len(paths) > 1 else os.path.dirname(paths[0])
    names = {p: os.path.relpath(p, base).replace(os.sep, "__").removesuffix(".tar") + ".parquet" for p in paths}
    if len(set(names.values())) != len(names):
        raise ValueError("input shards map to clashing output names: " + ", ".join(sorted(names)))
    return names


def remove_partial_files(fs: pafs.FileSystem, directory: str) -> int:
    """Temporary shards left by a killed run (never read: they do not end in .parquet)."""
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    stale = [i.path for i in infos if i.type == pafs.FileType.File and ".tmp-" in os.path.basename(i.path)]
    for path in stale:
        fs.delete_file(path)
    return len(stale)


# ---- the stage -----------------------------------------------------------------------------------------------


def resolve_vae(cfg: EncodeConfig) -> tuple[str, tuple[int, int, int], float]:
    """(local source, latent shape, scaling factor), read from the VAE's config without its weights. An offline VAE is
    fitted here, once, before any actor starts: the actors (on this machine) then find it cached."""
    from infgen.vae import vae_config

    try:
        source, config = vae_config(cfg.vae, cfg.vae_subfolder)
    except ValueError as e:
        raise ValueError(f"encode config: {e}") from None
    scale = 2 ** (len(config["block_out_channels"]) - 1)
    if cfg.input_size % scale:
        raise ValueError(f"encode config: input_size={cfg.input_size} is not a multiple of the VAE's {scale}× scale")
    side = cfg.input_size // scale
    return source, (int(config["latent_channels"]), side, side), float(config["scaling_factor"])


def read_tar_samples(fs: pafs.FileSystem, path: str) -> Iterator[dict]:
    """The samples of one webdataset .tar, streamed (never the whole shard in memory): dicts of member suffix →
    bytes plus `__key__` and `__url__` (= `path`), grouped by webdataset's own rules (key = name up to the first
    dot, suffixes lower-cased)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with fs.open_input_stream(path) as stream:
        yield from group_by_keys({**member, "__url__": path} for member in tar_file_iterator(stream))


def sample_batches(samples: Iterator[dict], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Samples → columnar batches of up to `size`, as `prepare_batch` takes them (a member a sample lacks is None)."""
    batch: list[dict] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield _columns(batch)
            batch = []
    if batch:
        yield _columns(batch)


def _columns(samples: list[dict]) -> dict[str, np.ndarray]:
    names = sorted({k for sample in samples for k in sample})
    return {k: _object_array([sample.get(k) for sample in samples]) for k in names}


class ShardEncoder:
    """A Ray Data actor that encodes whole input shards and writes each output shard itself.

    Per shard: the .tar is streamed; batches are decoded and cropped `decode_threads` at a time in a thread pool
    (PIL releases the GIL while it decodes, resizes and compresses), each prepared batch goes through the VAE
    (EncodeUDF) and into the parquet writer as it comes. So the images and latents never travel to the driver,
    and the decode overlaps the encoder. Returns one row of stats per shard.
    """

    def __init__(self, cfg: EncodeConfig, fs_in: pafs.FileSystem, fs_out: pafs.FileSystem,
                 latent_shape: tuple[int, int, int]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.cfg, self.fs_in, self.fs_out, self.latent_shape = cfg, fs_in, fs_out, latent_shape
        self.threads = cfg.decode_thread_count
        self.encoder = EncodeUDF(cfg.vae, cfg.vae_subfolder, cfg.input_size, cfg.num_gpus, cfg.precision,
                                 cfg.torch_threads or math.ceil(cfg.cpus_per_actor))
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")

    def __call__(self, plan: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats = [json.dumps(self.encode_shard(str(i), str(o))) for i, o in zip(plan["input"], plan["output"])]
        return {"input": plan["input"], "stats": _object_array(stats)}

    def encode_rows(self, rows: dict[str, np.ndarray], writer: shards.ShardWriter) -> None:
        """Prepared rows → VAE → writer, `batch_size` rows at a time: with crops_per_image = k, a batch of samples
        is k× as many rows, and the VAE's activations grow with its batch."""
        step = self.cfg.batch_size
        for i in range(0, len(rows["key"]), step):
            writer.add(self.encoder({k: v[i:i + step] for k, v in rows.items()}))

    def encode_shard(self, path: str, output: str) -> dict:
        import ray

        start = time.perf_counter()
        writer = shards.ShardWriter(self.fs_out, output, self.latent_shape)
        try:
            prepared: deque = deque()
            for batch in sample_batches(read_tar_samples(self.fs_in, path), self.cfg.batch_size):
                prepared.append(self.pool.submit(prepare_batch, batch, self.cfg))
                if len(prepared) > self.threads:  # keep every decode thread busy while the VAE runs
                    self.encode_rows(prepared.popleft().result(), writer)
            while prepared:
                self.encode_rows(prepared.popleft().result(), writer)
        except BaseException:
            writer.abort()
            raise
        stats = writer.commit()
        seconds = time.perf_counter() - start
        log.info("encode: %s → %s (%s) in %.1f s", uri(self.fs_in, path), uri(self.fs_out, output),
                 json.dumps(stats), seconds)
        return {**stats, "seconds": round(seconds, 3), "node": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid()}


def encode_shards(cfg: EncodeConfig, fs_in: pafs.FileSystem, pending: list[str], names: Mapping[str, str],
                  fs_out: pafs.FileSystem, out_dir: str, latent_shape: tuple[int, int, int]) -> dict[str, dict]:
    """Encode `pending` shards on an actor pool, one whole shard per call; the driver holds only the plan (input
    and output paths) and the per-shard stats that come back."""
    import ray

    cfg.ray.init()
    plan = ray.data.from_items([{"input": p, "output": f"{out_dir}/{names[p]}"} for p in pending],
                               override_num_blocks=len(pending))
    results = plan.map_batches(
        ShardEncoder, batch_size=1, batch_format="numpy", udf_modifying_row_count=False,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors, max_tasks_in_flight_per_actor=1),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.num_gpus,
        # the actor's own footprint plus the decoded images its threads may hold at once (decoded and converted)
        memory=DECODE_WORKER_BYTES + (cfg.decode_thread_count + 1) * cfg.max_image_pixels * 3 * 2,
        fn_constructor_kwargs=dict(cfg=cfg, fs_in=fs_in, fs_out=fs_out, latent_shape=latent_shape))
    written: dict[str, dict] = {}
    for row in results.iter_rows():  # in completion order; one small row per shard
        written[str(row["input"])] = json.loads(row["stats"])
    missing = sorted(set(pending) - set(written))
    if missing:
        raise RuntimeError(f"encode: no result for shards {missing[:5]}")
    return written


def aggregate_stats(fs: pafs.FileSystem, out_dir: str, output_names: list[str]) -> dict:
    total: Counter = Counter()
    for name in output_names:
        stats = shards.read_shard_stats(fs, f"{out_dir}/{name}")
        total.update(images_in=stats["images_in"], encoded=stats["encoded"])
        total.update({f"skipped.{k}": v for k, v in stats["skipped"].items()})
    stats = shards.shard_stats(total)
    stats["skipped_total"] = sum(stats["skipped"].values())
    return stats


def run_encode(config: EncodeConfig | Mapping[str, Any]) -> StageResult:
    """Encode every input shard not encoded yet; finish with `_stats.json` and `_SUCCESS` (see module doc).
    `config`: an EncodeConfig, or a mapping checked into one (ValueError naming the key)."""
    from pipelines.tracking import config_hash

    cfg = dataclass_from(EncodeConfig, config)
    fs_in, inputs = resolve_files(cfg.input, suffix=".tar")
    names = shard_names(inputs)
    vae_source, latent_shape, scaling_factor = resolve_vae(cfg)
    fs_out, root = output_root(cfg.output)
    out_dir = f"{root.rstrip('/')}/{fingerprint(fs_in, inputs, cfg.output_params(vae_source))}"  # a path on fs_out
    where = output_uri(cfg.output, os.path.basename(out_dir))  # what people and the next stage see: with its scheme
    if is_complete(fs_out, out_dir):
        log.info("encode: %s is complete, nothing to do", where)
        return StageResult(output=where, stats=read_json(fs_out, f"{out_dir}/{STATS}"), skipped=True)
    fs_out.create_dir(out_dir, recursive=True)
    remove_partial_files(fs_out, out_dir)
    pending = [p for p in inputs if not shards.shard_is_complete(fs_out, f"{out_dir}/{names[p]}")]
    log.info("encode: %d input shards, %d already encoded, output %s", len(inputs), len(inputs) - len(pending), where)

    lineage = {"infgen.stage": "encode", "infgen.input": cfg.input, "infgen.output": where,
               "infgen.fingerprint": os.path.basename(out_dir), "infgen.config_hash": config_hash(asdict(cfg))}
    tracker = cfg.mlflow.tracker("encode", tags=lineage, system_metrics=True) if cfg.mlflow.enabled else None
    with tracker or contextlib.nullcontext():
        if tracker:
            tracker.log_params({**asdict(cfg), "num_input_shards": len(inputs), "num_pending_shards": len(pending)})
        start = time.perf_counter()
        written = encode_shards(cfg, fs_in, pending, names, fs_out, out_dir, latent_shape) if pending else {}
        seconds = time.perf_counter() - start
        stats = aggregate_stats(fs_out, out_dir, [names[p] for p in inputs])
        images_run = sum(s["images_in"] for s in written.values())
        stats.update(
            shards=len(inputs), latent_shape=list(latent_shape), latent_dtype="float16", scaling_factor=scaling_factor,
            vae=cfg.vae, hr_format=cfg.hr_format, input_size=cfg.input_size,
            last_run={"shards_encoded": len(written), "shards_resumed": len(inputs) - len(pending),
                      "writer_nodes": len({s["node"] for s in written.values()}),
                      "writer_processes": len({(s["node"], s["pid"]) for s in written.values()}),
                      "images_in": images_run, "seconds": round(seconds, 3),
                      "images_per_s": round(images_run / seconds, 3) if seconds > 0 else None})
        write_json(fs_out, f"{out_dir}/{STATS}", stats)
        mark_success(fs_out, out_dir)
        if tracker:
            log_to_mlflow(tracker, cfg, stats, fs_out, out_dir, [names[p] for p in inputs])
    return StageResult(output=where, stats=stats, run_id=tracker.run_id if tracker else None)


# ---- MLflow --------------------------------------------------------------------------------------------------


def log_to_mlflow(tracker: Any, cfg: EncodeConfig, stats: dict, fs: pafs.FileSystem, out_dir: str,
                  output_names: list[str]) -> None:
    run = stats["last_run"]
    tracker.log_metrics({"images_in": stats["images_in"], "encoded": stats["encoded"],
                         "skipped_total": stats["skipped_total"], "images_per_s": run["images_per_s"],
                         "seconds": run["seconds"], **{f"skipped_{k}": v for k, v in stats["skipped"].items()}})
    tracker.log_dict(stats, "encode_stats.json")
    skipped = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items() if v) or "none"
    tracker.set_note(f"{stats['encoded']} of {stats['images_in']} images encoded into latents + high-resolution "
                     f"crops with the VAE {cfg.vae}; skipped: {skipped}.")
    if cfg.grid_samples <= 0:
        return
    try:  # a preview is worth a warning, never a failed stage
        grid = sample_grid(cfg, fs, out_dir, output_names)
    except Exception as e:
        log.warning("encode: sample grid failed: %s: %s", type(e).__name__, e)
        return
    if grid is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "encode_samples.png")
            with open(path, "wb") as f:
                f.write(grid)
            tracker.log_artifact(path)


def sample_grid(cfg: EncodeConfig, fs: pafs.FileSystem, out_dir: str, output_names: list[str]) -> Optional[bytes]:
    """PNG: the first few crops (top, as the VAE saw them) over the VAE decode of their latents (bottom)."""
    import ray

    latents, crops = [], []
    for name in output_names:
        # the first row group only (64 MB): the driver never reads a whole shard's crops
        table = shards.read_row_group(fs, f"{out_dir}/{name}", 0, ["latent", "hr"])
        table = table.slice(0, cfg.grid_samples - len(crops))
        latents.append(shards.latents(table))
        crops += table.column("hr").to_pylist()
        if len(crops) >= cfg.grid_samples:
            break
    if not crops:
        return None
    # the decode runs where the encoder ran (a GPU when there is one), not on the driver
    cfg.ray.init()
    task = ray.remote(_decode_latents).options(num_gpus=cfg.num_gpus, num_cpus=1)
    decoded = ray.get(task.remote(cfg.vae, cfg.vae_subfolder, np.concatenate(latents), cfg.num_gpus))
    cell = min(cfg.input_size, 256)
    grid = Image.new("RGB", (cell * len(crops), cell * 2))
    for i, (data, image) in enumerate(zip(crops, decoded)):
        crop = shards.hr_image(data)
        grid.paste(crop.resize((cell, cell), Image.BICUBIC), (i * cell, 0))
        grid.paste(Image.fromarray(image).resize((cell, cell), Image.BICUBIC), (i * cell, cell))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_latents(vae_source: str, subfolder: Optional[str], latents: np.ndarray, num_gpus: float) -> list:
    """Latents (N, C, h, w) float32 → the VAE's decodes, N uint8 arrays (H, W, 3)."""
    import torch

    from infgen.vae import load_vae

    device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
    vae = load_vae(vae_source, subfolder=subfolder, device=device)
    images = vae.decode(torch.from_numpy(np.array(latents)))  # a copy: Ray hands the task a read-only array
    return list(((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy())
