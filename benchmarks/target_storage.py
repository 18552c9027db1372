"""How to store the high-resolution training targets (issue 11): bytes per sample and decode time, measured on real
photos over 2 MP, for each way the encode stage can keep them, and what each costs for 5M images.

The catalogue's files over 2 MP with a short side of at least 1024 px (conf/photos.yaml). Options, each for the crop the encode stage takes (`prepare_crop`: square, short side ≥ 1024 as in
conf/cluster/encode.yaml, long side ≤ 2048):
    png       PNG, compress level 1 (the cluster default today)
    webp_ll   lossless WebP (method 0, the fastest)
    jpeg95    JPEG quality 95, 4:4:4 (a second JPEG generation: lossy)
    original  no second copy: the crop box into the original image, which the download shard holds already;
              decoded with Pillow's draft mode (JPEG DCT scaling), then cropped and resized
Per option: bytes per sample (original: 0 extra; its own size is reported), encode time, and the time to turn one
stored sample into a 1024² and a 2048² target (`pipelines.train.decode_targets`, what training does per sample per
step), on one thread. Also the originals' bytes per sample, which set the download shard size.

    python benchmarks/target_storage.py --out benchmarks/results/target_storage.json
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from infgen.data import target_window  # noqa: E402
from infgen.machine import describe_machine  # noqa: E402
from infgen.photos import load_photos  # noqa: E402
from pipelines.encode import EncodeConfig, crop_box_for, decode_image  # noqa: E402
from pipelines.shards import encode_hr  # noqa: E402
from pipelines.train import decode_targets  # noqa: E402

IMAGES = 5_000_000
SHARD_BYTES = 2 ** 30  # the usual target: about 1 GB per shard
MIN_PIXELS = 2_000_000  # what the filter keeps (conf/cluster/filter.yaml)


def timed(fn, repeats: int) -> float:
    """Best of `repeats` wall times of fn(), seconds (the machine may be shared)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def from_original(data: bytes, box: tuple[int, int, int, int], size: int) -> Image.Image:
    """The target straight from the original file: JPEG draft mode at the largest DCT reduction that keeps the
    crop at least `size`, then the crop box (scaled) and the resize."""
    image = Image.open(io.BytesIO(data))
    full = image.size
    side = min(box[2] - box[0], box[3] - box[1])
    reduce = max(1, side // size)
    image.draft("RGB", (full[0] // reduce, full[1] // reduce))
    sx, sy = image.size[0] / full[0], image.size[1] / full[1]
    region = (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy))
    return target_window(image.convert("RGB").crop(region), (size, size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="timings per sample; the best counts")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/target_storage.json")
    args = parser.parse_args()

    photos = load_photos()  # photographs and renders, both splits: only bytes and times are measured
    cfg = EncodeConfig(input="-", output="-", min_side=1024, hr_max_side=2048)
    options = {"png": dict(hr_format="png", png_compress_level=1), "jpeg95": dict(hr_format="jpeg", quality=95)}
    rows = {name: {"bytes": [], "encode_s": [], "decode_1024_s": [], "decode_2048_s": []}
            for name in (*options, "webp_ll", "original")}
    originals = {"bytes": [], "megapixels": []}
    skipped = []
    for photo in photos:
        data = photo.path.read_bytes()
        image = decode_image(data, cfg.max_image_pixels)
        if image.width * image.height < MIN_PIXELS or min(image.size) < cfg.min_side:
            skipped.append(f"{photo.name} ({image.width}x{image.height})")
            continue
        originals["bytes"].append(len(data))
        originals["megapixels"].append(image.width * image.height / 1e6)
        box = crop_box_for(photo.name, image.width, image.height, cfg)
        crop = image.crop(box)
        if max(crop.size) > cfg.hr_max_side:
            crop = crop.resize((cfg.hr_max_side, cfg.hr_max_side), Image.BICUBIC)
        for name, overrides in options.items():
            stored = encode_hr(crop, **overrides)
            rows[name]["encode_s"].append(timed(lambda: encode_hr(crop, **overrides), args.repeats))
            rows[name]["bytes"].append(len(stored))
            for size in (1024, 2048):
                rows[name][f"decode_{size}_s"].append(
                    timed(lambda: decode_targets([stored], (size, size)), args.repeats))

        def webp() -> bytes:
            buffer = io.BytesIO()
            crop.save(buffer, format="WEBP", lossless=True, method=0)
            return buffer.getvalue()

        stored = webp()
        rows["webp_ll"]["encode_s"].append(timed(webp, args.repeats))
        rows["webp_ll"]["bytes"].append(len(stored))
        for size in (1024, 2048):
            rows["webp_ll"][f"decode_{size}_s"].append(timed(lambda: decode_targets([stored], (size, size)),
                                                             args.repeats))
            rows["original"][f"decode_{size}_s"].append(timed(lambda: from_original(data, box, size),
                                                              args.repeats))
        rows["original"]["bytes"].append(0)
        rows["original"]["encode_s"].append(0.0)
        print(f"{photo.name}: {image.width}x{image.height}, crop {crop.size[0]} px, png "
              f"{rows['png']['bytes'][-1] / 1e6:.2f} MB, original {len(data) / 1e6:.2f} MB", flush=True)

    original_mean = statistics.mean(originals["bytes"])
    report = {
        "what": "bytes per sample and decode time of the high-resolution training target, per storage option",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**describe_machine(), "pillow_threads": 1, "pillow": Image.__version__},
        "data": {"photos": len(originals["bytes"]), "skipped_under_2MP_or_1024": skipped,
                 "source": sorted({p.source for p in photos}),
                 "crop": "square, short side >= 1024 px, long side <= 2048 (conf/cluster/encode.yaml)",
                 "original_megapixels_median": round(statistics.median(originals["megapixels"]), 2),
                 "original_bytes_mean": round(original_mean)},
        "options": {},
        "download_shard": {"bytes_per_sample_mean": round(original_mean),
                           "samples_per_1GiB_shard": int(SHARD_BYTES // original_mean)},
    }
    for name, row in rows.items():
        mean_bytes = statistics.mean(row["bytes"])
        report["options"][name] = {
            "bytes_per_sample_mean": round(mean_bytes),
            "encode_s_mean": round(statistics.mean(row["encode_s"]), 4),
            "decode_1024_s_mean": round(statistics.mean(row["decode_1024_s"]), 4),
            "decode_2048_s_mean": round(statistics.mean(row["decode_2048_s"]), 4),
            "total_TB_for_5M": round(mean_bytes * IMAGES / 1e12, 2),
            "encoded_samples_per_1GiB_shard": int(SHARD_BYTES // (mean_bytes + 4 * 64 * 64 * 2)) if mean_bytes else None,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["options"], indent=2), json.dumps(report["download_shard"]), f"→ {args.out}")


if __name__ == "__main__":
    main()
