"""filter → download → encode, end to end: LAION-style metadata in the real V2 schema, img2dataset
downloading from 127.0.0.1, the tiny VAE on a Ray actor pool; exact counts carried through every stage, and odd
images (16-bit, float, alpha, transparent palette) giving the same pixels as infgen.images.to_rgb on the file."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient
from PIL import Image

from infgen.images import to_rgb
from pipelines.common import resolve_files
from pipelines.download import run_download
from pipelines.encode import decode_image, run_encode
from pipelines.filter import run_filter
from pipelines.sample_data import (LARGE_PHOTOS, MISSING, ODD_IMAGES, serve, write_laion_parquet, write_odd_images,
                                   write_photos)
from pipelines.shards import read_rows, tensor_column

BROKEN_ROWS = ["truncated.jpg", "html.jpg", "empty.jpg", "bomb.png", "tiny.jpg", MISSING]
# where each broken row is counted: the download stores every body it gets undecoded, the encode stage judges it
# (until issue 13 the download counted decode 2, empty 1, too_large 1, too_small 1 of them)
DOWNLOAD_FAILURES = {"http_404": 1}
ENCODE_SKIPS = {"corrupt": 1, "not_an_image": 1, "empty": 1, "decompression_bomb": 1, "too_small": 1}


def test_filter_download_encode(ray_local, tmp_path, tiny_vae):
    sizes = write_photos(tmp_path / "www") | write_odd_images(tmp_path / "www")
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    with serve(tmp_path / "www") as base:
        rows = [{"url": f"{base}/{name}", "text": f"photo {name}", "width": w, "height": h, "aesthetic": 6.5}
                for name, (w, h) in sizes.items()]
        rows += [  # dropped by the filter, one reason each
            {"url": f"{base}/small.jpg", "text": "small", "width": 800, "height": 600, "aesthetic": 6.5},
            {"url": f"{base}/ugly.jpg", "text": "ugly", "width": 2000, "height": 1500, "aesthetic": 3.0},
            {"url": f"{base}/astronaut.jpg", "text": "again", "width": 1600, "height": 1600, "aesthetic": 6.5},
            {"url": "ftp://example.org/a.jpg", "text": "ftp", "width": 2000, "height": 1500, "aesthetic": 6.5},
        ]
        write_laion_parquet(tmp_path / "laion" / "part-0.parquet", rows[:9], "aesthetics_v2")
        write_laion_parquet(tmp_path / "laion" / "part-1.parquet", rows[9:], "aesthetics_v2")

        filtered = run_filter({"input": str(tmp_path / "laion"), "output": str(tmp_path / "filter"),
                               "allow_private_hosts": True, "min_aesthetic": 5.0, "min_short_side": 1024,
                               "mlflow": {"tracking_uri": tracking, "experiment": "e2e"}})
        kept = len(LARGE_PHOTOS) + len(ODD_IMAGES) + len(BROKEN_ROWS)
        assert filtered.stats["rows_in"] == kept + 4 and filtered.stats["rows_out"] == kept
        assert {k: v for k, v in filtered.stats["dropped"].items() if v} == {
            "too_small": 1, "low_aesthetic": 1, "bad_url": 1, "duplicate_url": 1}

        downloaded = run_download({"input": filtered.output, "output": str(tmp_path / "download"),
                                   "number_sample_per_shard": 8, "processes_count": 1, "timeout": 5, "retries": 0,
                                   "mlflow": {"tracking_uri": tracking, "experiment": "e2e"}})
    usable = len(LARGE_PHOTOS) + len(ODD_IMAGES)
    assert downloaded.stats["rows"] == kept and downloaded.stats["failures"] == DOWNLOAD_FAILURES
    assert downloaded.stats["success"] == kept - sum(DOWNLOAD_FAILURES.values())

    encoded = run_encode({"input": f"{downloaded.output}/shards", "output": str(tmp_path / "encoded"),
                          "vae": "tiny", "input_size": 256, "min_side": 512, "hr_max_side": 1024,
                          "mlflow": {"tracking_uri": tracking, "experiment": "e2e"}})
    # every row once: rows = download success + failures; encode's images_in = that success = encoded + skips
    assert encoded.stats["images_in"] == downloaded.stats["success"]
    assert encoded.stats["encoded"] == usable and encoded.stats["skipped"] == ENCODE_SKIPS
    table = read_rows(*resolve_files(encoded.output))
    assert table.num_rows == usable and len(set(table.column("key").to_pylist())) == table.num_rows
    latents = tensor_column(table, "latent")  # as stored
    assert latents.shape == (usable, 4, 32, 32) and str(latents.dtype) == "float16"
    assert sorted(u.rsplit("/", 1)[1] for u in table.column("url").to_pylist()) == sorted(
        [f"{n}.jpg" for n in LARGE_PHOTOS] + list(ODD_IMAGES))

    # the odd images: stored byte for byte under key.jpg (PNG / TIFF bytes), decoded by content into to_rgb's
    # pixels of the served file: the high-resolution target is exactly that crop (OpenCV made the ramps white/black)
    stored = {}
    for tar in Path(downloaded.output, "shards").glob("*.tar"):
        with tarfile.open(tar) as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name.removesuffix(".json")
                image = [m for m in members if m.startswith(f"{key}.") and m not in (name, f"{key}.txt")]
                stored[json.loads(data)["url"].rsplit("/", 1)[1]] = (image, members[image[0]])
    rows = {u.rsplit("/", 1)[1]: i for i, u in enumerate(table.column("url").to_pylist())}
    boxes = tensor_column(table, "crop_box")
    for name in ODD_IMAGES:
        member, data = stored[name]
        assert member == [f"{member[0].split('.')[0]}.jpg"] and data == (tmp_path / "www" / name).read_bytes(), name
        original = to_rgb(Image.open(tmp_path / "www" / name))
        np.testing.assert_array_equal(np.asarray(decode_image(data, 10 ** 8)), np.asarray(original), err_msg=name)
        i = rows[name]
        box = tuple(boxes[i].tolist())
        hr = Image.open(io.BytesIO(table.column("hr")[i].as_py()))
        crop = original.crop(box)
        if crop.size != hr.size:  # the crop's long side over hr_max_side: downscaled as encode does it
            crop = crop.resize(hr.size, Image.BICUBIC)
        np.testing.assert_array_equal(np.asarray(hr), np.asarray(crop), err_msg=name)
    for name in ("ramp16.png", "ramp_float.tif"):
        ramp = np.asarray(decode_image(stored[name][1], 10 ** 8))
        assert abs(ramp.mean() - 127.5) < 1.5 and ramp[:, 0].max() <= 1 and ramp[:, -1].min() >= 254, name

    # reruns of every stage are no-ops
    assert run_encode({"input": f"{downloaded.output}/shards", "output": str(tmp_path / "encoded"), "vae": "tiny",
                       "input_size": 256, "min_side": 512, "hr_max_side": 1024,
                       "mlflow": {"enabled": False}}).skipped

    runs = MlflowClient(tracking).search_runs([MlflowClient(tracking).get_experiment_by_name("e2e").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["download", "encode", "filter"]
