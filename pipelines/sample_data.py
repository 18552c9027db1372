"""A small LAION-style world for the demo and the pipeline tests: real photos (the demo's: the wallpaper files of
conf/photos.yaml; the tests': photos that installed packages ship), broken files, an HTTP server on 127.0.0.1
serving them, and metadata parquet in each real LAION schema variant. Nothing here is downloaded from outside:
img2dataset really downloads these files from the local server."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import os
import threading
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from infgen.images import shipped_photos
from infgen.photos import Photo

# the pipeline tests' photos: name → (width, height) of the served photo (shipped photos upsampled to ~2 MP),
# several aspect ratios
LARGE_PHOTOS = {
    "astronaut": (1600, 1600), "chelsea": (1800, 1200), "coffee": (1800, 1200), "rocket": (1920, 1280),
    "motorcycle": (2000, 1350), "china": (1920, 1280), "flower": (1920, 1280), "grace_hopper": (1400, 1600),
}
BROKEN = {
    "truncated.jpg": "a JPEG cut in half",
    "html.jpg": "an HTML page served as .jpg",
    "empty.jpg": "a 0-byte file",
    "bomb.png": "a decompression bomb (20000×20000 PNG, a few KB on disk)",
    "tiny.jpg": "a 40×30 image whose metadata claims 2000×1500",
}
MISSING = "missing.jpg"  # never written: the server answers 404


def write_photos(directory: Path) -> dict[str, tuple[int, int]]:
    """Write the large photos as JPEG (quality 95) and the broken files; return name → (width, height)."""
    directory.mkdir(parents=True, exist_ok=True)
    photos = shipped_photos(list(LARGE_PHOTOS))
    sizes = {}
    for name, (w, h) in LARGE_PHOTOS.items():
        photos[name].resize((w, h), Image.BICUBIC).save(directory / f"{name}.jpg", quality=95)
        sizes[f"{name}.jpg"] = (w, h)
    good = (directory / "chelsea.jpg").read_bytes()
    (directory / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (directory / "html.jpg").write_bytes(b"<!doctype html><html><body>Not found, but 200 OK</body></html>")
    (directory / "empty.jpg").write_bytes(b"")
    (directory / "bomb.png").write_bytes(decompression_bomb_png(20000, 20000))
    photos["chelsea"].resize((40, 30)).save(directory / "tiny.jpg", quality=90)
    sizes.update({"truncated.jpg": (1800, 1200), "html.jpg": (1800, 1200), "empty.jpg": (1800, 1200),
                  "bomb.png": (20000, 20000), "tiny.jpg": (2000, 1500), MISSING: (1800, 1200)})
    return sizes


# images that OpenCV (img2dataset's decoder) turns into other pixels, or that carry transparency: every stage must
# give infgen.images.to_rgb's pixels for them (issue 13)
ODD_IMAGES = {
    "ramp16.png": "a 16-bit greyscale PNG, a horizontal ramp 0..65535 (OpenCV: a white JPEG)",
    "ramp_float.tif": "a float32 TIFF, a horizontal ramp 0..1 (OpenCV: a black JPEG)",
    "rgba.png": "an RGBA PNG in colour, its alpha fading to transparent from top to bottom",
    "palette.png": "a palette PNG of four colour bands, one of them the transparent colour",
}


def write_odd_images(directory: Path, size: tuple[int, int] = (1600, 1280)) -> dict[str, tuple[int, int]]:
    """Write ODD_IMAGES at `size` (width, height); return name → (width, height)."""
    directory.mkdir(parents=True, exist_ok=True)
    w, h = size
    ramp = np.repeat(np.linspace(0, 1, w)[None, :], h, axis=0)
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(directory / "ramp16.png")
    Image.fromarray(ramp.astype(np.float32)).save(directory / "ramp_float.tif")
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., 0] = np.round(ramp * 255)
    rgba[..., 1] = np.round(np.linspace(0, 255, h))[:, None]
    rgba[..., 2] = 90
    rgba[..., 3] = np.round(np.linspace(255, 0, h))[:, None]
    Image.fromarray(rgba, "RGBA").save(directory / "rgba.png")
    palette = Image.fromarray(np.minimum(np.arange(w) * 4 // w, 3).astype(np.uint8)[None, :].repeat(h, 0), "P")
    palette.putpalette([200, 30, 30, 30, 160, 40, 20, 40, 220, 0, 0, 0])
    palette.save(directory / "palette.png", transparency=3)  # the right-hand band (black) is transparent
    return {name: size for name in ODD_IMAGES}


def decompression_bomb_png(width: int, height: int) -> bytes:
    """A valid greyscale PNG of width×height zeros: tiny on disk, `width·height` bytes once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    body = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # clients that hang up early (img2dataset timeouts, tests) are not errors here


@contextlib.contextmanager
def serve(directory: Path, port: int = 0) -> Iterator[str]:
    """Serve `directory` on 127.0.0.1 (`port`, or a free one) in a thread; yield the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    try:
        server = _QuietServer(("127.0.0.1", port), handler)
    except OSError as e:
        raise RuntimeError(f"cannot serve {directory} on 127.0.0.1:{port}: {e} (choose another port)") from None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ---- metadata ---------------------------------------------------------------------------------------------

def laion_table(rows: list[dict], variant: str) -> pa.Table:
    """Rows with keys url, text, width, height, aesthetic, punsafe, pwatermark → a table in the schema of
    `variant`: 'aesthetics_v2' (float64 sizes, AESTHETIC_SCORE), 'aesthetic_v1' (int32 sizes, lowercase
    `aesthetic`) or 'high_resolution' (int32 sizes, no score)."""
    n = len(rows)
    col = lambda key, default=None: [r.get(key, default) for r in rows]  # noqa: E731
    common = {"URL": pa.array(col("url"), pa.string()), "TEXT": pa.array(col("text", ""), pa.string())}
    if variant == "aesthetics_v2":
        return pa.table({**common,
                         "WIDTH": pa.array(col("width"), pa.float64()), "HEIGHT": pa.array(col("height"), pa.float64()),
                         "similarity": pa.array(np.full(n, 0.3), pa.float64()),
                         "punsafe": pa.array(col("punsafe", 0.01), pa.float32()),
                         "pwatermark": pa.array(col("pwatermark", 0.05), pa.float32()),
                         "AESTHETIC_SCORE": pa.array(col("aesthetic", 6.0), pa.float32()),
                         "hash": pa.array(np.arange(n), pa.int64()),
                         "__index_level_0__": pa.array(np.arange(n), pa.int64())})
    if variant == "aesthetic_v1":
        return pa.table({**common,
                         "WIDTH": pa.array(col("width"), pa.int32()), "HEIGHT": pa.array(col("height"), pa.int32()),
                         "similarity": pa.array(np.full(n, 0.3), pa.float64()),
                         "hash": pa.array(np.arange(n), pa.int64()),
                         "punsafe": pa.array(col("punsafe", 0.01), pa.float32()),
                         "pwatermark": pa.array(col("pwatermark", 0.05), pa.float32()),
                         "aesthetic": pa.array(col("aesthetic", 6.0), pa.float32())})
    if variant == "high_resolution":
        return pa.table({**common,
                         "WIDTH": pa.array(col("width"), pa.int32()), "HEIGHT": pa.array(col("height"), pa.int32()),
                         "similarity": pa.array(np.full(n, 0.3), pa.float64()),
                         "LANGUAGE": pa.array(["en"] * n, pa.string()),
                         "hash": pa.array(np.arange(n), pa.int64()),
                         "pwatermark": pa.array(col("pwatermark", 0.05), pa.float32()),
                         "punsafe": pa.array(col("punsafe", 0.01), pa.float32())})
    raise ValueError(f"unknown LAION variant {variant!r}")


def write_laion_parquet(path: Path, rows: list[dict], variant: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(laion_table(rows, variant), path)
    return path


def image_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# broken files the demo serves (download and encode count them): name → what it is
DEMO_BROKEN = {"truncated.jpg": "a JPEG cut short", "html.jpg": "an HTML page served as .jpg",
               MISSING: "never written: the server answers 404"}
CLAIMED_SIZE = (3000, 2000)  # what the metadata says of rows that are not photos: over 2 MP, so the filter keeps
#                             the broken ones and drops the others only for the reason they are there for


@dataclass
class DemoDataset:
    """What `write_demo_dataset` wrote."""

    metadata: Path  # the LAION-Aesthetics-V2 parquet: the pipeline's input
    holdout_urls: Optional[Path]  # the held-out photos' URLs, one per line (train and evaluate `holdout.urls`)
    counts: dict[str, int]  # rows, photos, held_out, broken, filtered_out (rows planted to drop): the demo's summary


def write_demo_dataset(directory: Path, base_url: str, photos: Sequence[Photo],
                       holdout_urls: Optional[Path] = None) -> DemoDataset:
    """The demo's LAION-Aesthetics-V2 metadata over files in `directory` (served at `base_url`):

    * every photo (`infgen.photos.load_photos()`: the wallpapers) as the file it is, linked under its file name,
      with its credit as the caption and its real WIDTH/HEIGHT (read from the file): files under the filter's
      2 MP are dropped there, like any small LAION image;
    * the broken files of DEMO_BROKEN (download and encode count them);
    * rows the filter must drop, one reason each: too small, low aesthetic score, NSFW, watermark, a duplicate URL.
    With `holdout_urls`, the URLs of the photos whose split is 'holdout' are written there, one per line: the
    fixed split by file that training and evaluation read (pipelines.holdout.Holdout).
    Files are linked, not copied (the wallpapers are ~100 MB): the server sends their bytes as they are, PNGs
    included, and the download stage stores them as they are (the encode stage decodes them), as it would on LAION.
    Raises ValueError when two photos share a file name (their URLs would clash).
    """
    if not photos:
        raise ValueError("write_demo_dataset: no photos to serve")
    directory.mkdir(parents=True, exist_ok=True)
    rows, held, served = [], [], {}
    for photo in photos:
        link = directory / photo.path.name
        if link.name in served:
            raise ValueError(f"two photos are named {link.name} ({served[link.name]} and {photo.path}): their URLs "
                             f"would clash")
        served[link.name] = photo.path
        if not (link.is_symlink() and os.readlink(link) == str(photo.path)):
            link.unlink(missing_ok=True)
            link.symlink_to(photo.path)
        with Image.open(photo.path) as image:  # the header only
            width, height = image.size
        rows.append({"url": f"{base_url}/{link.name}", "text": photo.credit(), "width": width, "height": height,
                     "aesthetic": 6.5})
        if photo.split == "holdout":
            held.append(rows[-1]["url"])
    good = len(rows)
    chelsea = shipped_photos(["chelsea"])["chelsea"]
    (directory / "truncated.jpg").write_bytes(jpeg_bytes(chelsea)[:20_000])
    (directory / "html.jpg").write_bytes(b"<!doctype html><html><body>Not found, but 200 OK</body></html>")
    width, height = CLAIMED_SIZE
    rows += [{"url": f"{base_url}/{name}", "text": what, "width": width, "height": height, "aesthetic": 6.0}
             for name, what in DEMO_BROKEN.items()]
    # one reason each; the demo prints how many, so the count comes from this list
    planted = [{"url": f"{base_url}/thumb.jpg", "text": "too small", "width": 120, "height": 90},
               {"url": f"{base_url}/ugly.jpg", "text": "low score", "width": width, "height": height, "aesthetic": 3.0},
               {"url": f"{base_url}/nsfw.jpg", "text": "unsafe", "width": width, "height": height, "punsafe": 0.99},
               {"url": f"{base_url}/logo.jpg", "text": "watermark", "width": width, "height": height,
                "pwatermark": 0.95},
               {**rows[0], "text": "the same URL again"}]
    rows += planted
    path = directory / "metadata" / "laion-demo.parquet"
    table = laion_table(rows, "aesthetics_v2")
    if not path.exists() or not pq.read_table(path).equals(table):  # unchanged: keep the mtime (fingerprints)
        write_laion_parquet(path, rows, "aesthetics_v2")
    if holdout_urls is not None:
        holdout_urls = Path(holdout_urls)
        holdout_urls.parent.mkdir(parents=True, exist_ok=True)
        holdout_urls.write_text("".join(f"{url}\n" for url in held))
    return DemoDataset(path, holdout_urls, {"rows": len(rows), "photos": good, "held_out": len(held),
                                            "broken": len(DEMO_BROKEN), "filtered_out": len(planted)})


def write_encoded_shards(directory: Path, latents: torch.Tensor, hr: torch.Tensor, shards: int = 2,
                         urls: Optional[Sequence[str]] = None) -> Path:
    """In-memory (latents (N, C, h, w), crops (N, 3, H, W) in [-1, 1]) → `shards` parquet files in the encode
    stage's format (pipelines.shards, crops as PNG), rows dealt round-robin; keys `<shard><row>`, URLs `urls[i]`
    (several crops of one image share one) or http://127.0.0.1/<key>.jpg. For tests and benchmarks that need
    training data without running the stages."""
    from infgen.images import to_pil
    from pipelines.shards import encode_hr, write_shard

    directory.mkdir(parents=True, exist_ok=True)
    h, w = hr.shape[2:]
    for shard in range(shards):
        rows = list(range(shard, len(latents), shards))
        keys = [f"{shard:05d}{i:06d}" for i in rows]
        n = len(rows)
        write_shard(str(directory / f"{shard:05d}.parquet"), {
            "key": keys, "latent": latents[rows].numpy().astype(np.float16),
            "hr": [encode_hr(to_pil(hr[i])) for i in rows], "hr_width": [w] * n, "hr_height": [h] * n,
            "crop_box": np.tile(np.array([0, 0, w, h], np.int32), (n, 1)),
            "orig_width": [w] * n, "orig_height": [h] * n, "caption": [None] * n,
            "url": [urls[i] for i in rows] if urls is not None else [f"http://127.0.0.1/{k}.jpg" for k in keys]},
            tuple(latents.shape[1:]))
    return directory
