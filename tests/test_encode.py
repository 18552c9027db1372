"""Stage 3 (pipelines/encode.py): offline, CPU, a real local Ray, the tiny VAE, real photos over 2 MP and broken
files packed into webdataset shards the way img2dataset writes them (key.jpg / key.txt / key.json)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from infgen.images import to_rgb, to_tensor
from pipelines.common import STATS, SUCCESS
from pipelines.config import dataclass_from
from pipelines.encode import (EncodeConfig, EncodeUDF, SkipSample, crop_box_for, decode_image, prepare_sample,
                              resolve_vae, run_encode)
from pipelines.sample_data import LARGE_PHOTOS, ODD_IMAGES, write_odd_images, write_photos
from pipelines.shards import read_rows as read_shards
from pipelines.shards import read_shard_stats, tensor_column

ROOT = Path(__file__).resolve().parents[1]
SIZE = 256  # input_size in the Ray tests: latents (4, 32, 32), a quarter of the CPU time of 512²
GOOD = [f"{name}.jpg" for name in LARGE_PHOTOS]
# the broken samples and the reason each must be counted under
BROKEN = {"truncated.jpg": "corrupt", "html.jpg": "not_an_image", "empty.jpg": "empty",
          "bomb.png": "decompression_bomb", "tiny.jpg": "too_small", None: "missing_image"}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("photos")
    write_photos(directory)
    return directory


def pack_shards(photo_dir: Path, directory: Path, groups: list[list], prefix: str = "") -> dict[str, str]:
    """Write one .tar per group of file names (None: a sample with no image member); return key → name."""
    import webdataset as wds

    directory.mkdir(parents=True, exist_ok=True)
    keys = {}
    for s, group in enumerate(groups):
        with wds.TarWriter(str(directory / f"{s:05d}.tar")) as tar:
            for i, name in enumerate(group):
                key = f"{prefix}{s:05d}{i:04d}"
                sample = {"__key__": key, "txt": f"a photo: {name}",
                          "json": json.dumps({"url": f"http://127.0.0.1/{name}", "key": key, "status": "success"})}
                if name is not None:  # the bomb as .png, the rest as img2dataset's .jpg
                    sample["png" if name.endswith(".png") else "jpg"] = (photo_dir / name).read_bytes()
                tar.write(sample)
                keys[key] = name
    return keys


@pytest.fixture(scope="module")
def shards(photo_dir, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    broken = list(BROKEN)
    groups = [GOOD[:3] + broken[:2], GOOD[3:6] + broken[2:4], GOOD[6:] + broken[4:]]
    directory = tmp_path_factory.mktemp("shards")
    return directory, pack_shards(photo_dir, directory, groups)


def config(input_spec, output, **overrides) -> dict:
    base = dict(input=str(input_spec), output=str(output), vae="tiny", input_size=SIZE, min_side=SIZE,
                aspect_range=[0.75, 1.333], hr_max_side=1024, batch_size=4, num_actors=1, grid_samples=0,
                mlflow={"enabled": False})
    return {**base, **overrides}


def read_rows(output: str) -> dict:
    table = read_shards(pafs.LocalFileSystem(), [str(p) for p in sorted(Path(output).glob("*.parquet"))])
    rows = {name: table[name].to_pylist() for name in table.column_names if name not in ("latent", "crop_box")}
    rows["latent"] = tensor_column(table, "latent")  # as stored
    rows["crop_box"] = tensor_column(table, "crop_box")
    return rows


@pytest.fixture(scope="module")
def first_run(shards, ray_local, tiny_vae, mlflow_server, tmp_path_factory):
    directory, _ = shards
    cfg = config(directory, tmp_path_factory.mktemp("encoded"), grid_samples=3,
                 mlflow={"tracking_uri": mlflow_server, "experiment": "test-encode"})
    return cfg, run_encode(cfg)


# ---- the stage on Ray ----------------------------------------------------------------------------------------


def test_counts_every_skip_reason_exactly(first_run, shards):
    _, result = first_run
    stats = result.stats
    assert stats["images_in"] == len(GOOD) + len(BROKEN)
    assert stats["encoded"] == len(GOOD)
    assert stats["skipped"] == {reason: 1 for reason in BROKEN.values()}
    assert stats["shards"] == 3 and stats["latent_shape"] == [4, SIZE // 8, SIZE // 8]
    out = Path(result.output)
    assert (out / SUCCESS).is_file() and json.loads((out / STATS).read_text()) == stats
    per_shard = [read_shard_stats(pafs.LocalFileSystem(), str(p)) for p in sorted(out.glob("*.parquet"))]
    assert [s["images_in"] for s in per_shard] == [5, 5, 4]
    assert not result.skipped and result.run_id


def test_the_output_records_its_latent_space_for_training(first_run, shards, tiny_vae):
    """Training reads the scaling factor its model records from here, without loading the VAE's weights;
    shards that are not one encode output's have no record."""
    from pipelines.common import resolve_files
    from pipelines.shards import recorded_latent_space

    _, result = first_run
    fs, paths = resolve_files(result.output)
    assert recorded_latent_space(fs, paths) == {"vae": "tiny", "scaling_factor": tiny_vae.scaling_factor,
                                                "latent_shape": [4, SIZE // 8, SIZE // 8]}
    directory, _ = shards
    other = resolve_files(str(directory), suffix=".tar")
    assert recorded_latent_space(*other) is None
    assert recorded_latent_space(fs, paths + [str(directory / "elsewhere.parquet")]) is None


def test_rows_hold_latent_crop_and_metadata(first_run, shards):
    cfg, result = first_run
    _, keys = shards
    rows = read_rows(result.output)
    assert sorted(rows["key"]) == sorted(k for k, name in keys.items() if name in GOOD)  # no duplicates
    assert rows["latent"].shape == (len(GOOD), 4, SIZE // 8, SIZE // 8) and rows["latent"].dtype == np.float16
    assert np.isfinite(rows["latent"]).all()
    for i, key in enumerate(rows["key"]):
        name = keys[key]
        left, top, right, bottom = rows["crop_box"][i].tolist()
        width, height = right - left, bottom - top
        assert (rows["orig_width"][i], rows["orig_height"][i]) == LARGE_PHOTOS[name[:-4]]
        assert 0 <= left < right <= rows["orig_width"][i] and 0 <= top < bottom <= rows["orig_height"][i]
        assert min(width, height) >= SIZE and 0.75 - 0.01 <= width / height <= 1.333 + 0.01
        hr = Image.open(io.BytesIO(rows["hr"][i]))
        assert hr.format == "PNG" and hr.size == (rows["hr_width"][i], rows["hr_height"][i])
        assert max(hr.size) == min(max(width, height), cfg["hr_max_side"])  # downscaled only when larger
        assert abs(hr.width / hr.height - width / height) < 0.01
        assert rows["caption"][i] == f"a photo: {name}" and rows["url"][i] == f"http://127.0.0.1/{name}"


def test_latents_decode_to_their_own_crops(first_run, tiny_vae):
    _, result = first_run
    rows = read_rows(result.output)
    decoded = tiny_vae.decode(torch.from_numpy(rows["latent"].astype(np.float32)))
    crops = torch.stack([to_tensor(Image.open(io.BytesIO(b)).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC))
                         for b in rows["hr"]])
    mse = ((decoded[:, None] - crops[None]) ** 2).mean(dim=(2, 3, 4))  # [decoded i, crop j]
    assert torch.equal(mse.argmin(dim=1), torch.arange(len(crops))), mse
    psnr = 10 * torch.log10(4 / mse.diagonal())  # images span [-1, 1]: peak-to-peak 2
    assert psnr.min() > 14, psnr


def test_mlflow_run_has_counts_and_artifacts(first_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    _, result = first_run
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.data.metrics["encoded"] == len(GOOD) and run.data.metrics["skipped_decompression_bomb"] == 1
    assert run.data.metrics["images_per_s"] > 0
    assert run.data.params["input_size"] == str(SIZE) and run.data.tags["infgen.output"] == result.output
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"encode_stats.json", "encode_samples.png"} <= artifacts
    grid = Image.open(client.download_artifacts(result.run_id, "encode_samples.png"))
    assert grid.size == (3 * SIZE, 2 * SIZE)


def test_rerun_of_a_complete_output_is_skipped(first_run):
    cfg, result = first_run
    before = {p.name: p.stat().st_mtime_ns for p in Path(result.output).iterdir()}
    again = run_encode(cfg)
    assert again.skipped and again.output == result.output and again.stats == result.stats
    assert {p.name: p.stat().st_mtime_ns for p in Path(result.output).iterdir()} == before


def test_crops_are_reproducible_whatever_the_batching(first_run, shards, tmp_path):
    _, result = first_run
    directory, _ = shards
    again = run_encode(config(directory / "00000.tar", tmp_path, batch_size=1))
    first, second = read_rows(result.output), read_rows(again.output)
    index = {k: i for i, k in enumerate(first["key"])}
    assert second["key"] and set(second["key"]) <= set(index)
    for j, key in enumerate(second["key"]):
        i = index[key]
        assert second["crop_box"][j].tolist() == first["crop_box"][i].tolist()
        assert second["hr"][j] == first["hr"][i]
        np.testing.assert_allclose(second["latent"][j], first["latent"][i], atol=2e-2)


def test_killed_midway_then_rerun_loses_and_duplicates_nothing(photo_dir, ray_local, tiny_vae, tmp_path):
    import ray

    groups = [GOOD[i:i + 2] for i in range(0, 8, 2)] + [GOOD[:2]]  # 5 shards, 2 photos each
    keys = pack_shards(photo_dir, tmp_path / "shards", groups, prefix="k")
    overrides = config(tmp_path / "shards", tmp_path / "out", batch_size=1)
    args = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in overrides.items() if k != "mlflow"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.encode", "--config", "conf/data/encode.yaml", *args,
                             "mlflow.enabled=false"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while not list((tmp_path / "out").glob("*/*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a crash: no cleanup of any kind
    _, stderr = proc.communicate()
    # Ray kills a dead driver's actors some seconds later, and one may still finish its shard meanwhile: count the
    # finished shards once their CPUs are back (nothing else holds any)
    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.time() < deadline, "the killed run's encode actors still hold CPUs after 60 s"
        time.sleep(0.2)
    out_dir = next((tmp_path / "out").iterdir())
    done = sorted(p.name for p in out_dir.glob("*.parquet"))
    assert 1 <= len(done) < len(groups) and not (out_dir / SUCCESS).exists(), stderr.decode()[-3000:]

    result = run_encode(overrides)
    assert result.output == str(out_dir)
    assert result.stats["last_run"]["shards_resumed"] == len(done)
    rows = read_rows(result.output)
    assert sorted(rows["key"]) == sorted(keys) and len(set(rows["key"])) == len(keys)
    assert result.stats["images_in"] == result.stats["encoded"] == len(keys)
    assert not [p for p in out_dir.iterdir() if ".tmp-" in p.name]


# ---- pieces, without Ray ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in BROKEN if n and BROKEN[n] != "too_small"])
def test_decode_names_the_reason(photo_dir, name):
    with pytest.raises(SkipSample) as e:
        decode_image((photo_dir / name).read_bytes(), max_pixels=100_000_000)
    assert e.value.reason == BROKEN[name]


def test_pil_bomb_warning_is_a_skip_too(photo_dir):
    data = (photo_dir / "chelsea.jpg").read_bytes()  # 1800×1200 = 2.16 MP: PIL only warns below 2× its limit
    assert decode_image(data, max_pixels=3_000_000).size == (1800, 1200)
    with pytest.raises(SkipSample, match="decompression_bomb"):
        decode_image(data, max_pixels=2_000_000)
    assert Image.MAX_IMAGE_PIXELS not in (2_000_000, 3_000_000)  # PIL's global is restored


def test_crop_boxes_follow_key_seed_and_ranges():
    cfg = dataclass_from(EncodeConfig, config("in", "out", min_side=512, aspect_range=[0.5, 2.0]))
    boxes = {k: crop_box_for(k, 1800, 1200, cfg) for k in (f"{i:09d}" for i in range(200))}
    assert crop_box_for("000000007", 1800, 1200, cfg) == boxes["000000007"]
    assert len(set(boxes.values())) == len(boxes)
    for left, top, right, bottom in boxes.values():
        w, h = right - left, bottom - top
        assert min(w, h) >= 512 and right <= 1800 and bottom <= 1200 and 0.5 - 0.01 <= w / h <= 2.0 + 0.01
    reseeded = dataclass_from(EncodeConfig, config("in", "out", min_side=512, aspect_range=[0.5, 2.0], seed=1))
    assert crop_box_for("000000007", 1800, 1200, reseeded) != boxes["000000007"]
    wide_only = dataclass_from(EncodeConfig, config("in", "out", min_side=512, aspect_range=[1.5, 2.0]))
    with pytest.raises(SkipSample, match="no_crop_in_aspect_range"):
        crop_box_for("k", 600, 1200, wide_only)  # portrait, too narrow for a wide 512-pixel crop
    with pytest.raises(SkipSample, match="too_small"):
        crop_box_for("k", 2000, 500, cfg)


def test_default_config_gives_64_latents_in_float16(photo_dir, tiny_vae):
    from jobs.config import load_job_config

    cfg = dataclass_from(EncodeConfig, load_job_config(ROOT / "conf/data/encode.yaml", ["input=x", "output=y"]))
    source, shape, scaling = resolve_vae(cfg)
    assert cfg.input_size == 512 and shape == (4, 64, 64) and scaling == tiny_vae.scaling_factor
    row = prepare_sample("000000001", (photo_dir / "rocket.jpg").read_bytes(), cfg)
    assert min(row["crop_box"][2] - row["crop_box"][0], row["crop_box"][3] - row["crop_box"][1]) >= 512
    udf = EncodeUDF(source, None, cfg.input_size, cfg.num_gpus, cfg.precision, threads=1)
    out = udf({"pixels": np.array([row["pixels"], b""], dtype=object),
               "skip_reason": np.array(["", "empty"], dtype=object)})
    latent = np.frombuffer(out["latent"][0], np.float16).reshape(shape)
    expected = tiny_vae.encode(to_tensor(Image.frombytes("RGB", (512, 512), row["pixels"]))[None])[0]
    np.testing.assert_allclose(latent, expected.numpy(), atol=1e-2)
    assert out["latent"][1] == b"" and list(out["skip_reason"]) == ["", "empty"]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown keys.*'input_sise'"):
        dataclass_from(EncodeConfig, {"input": "x", "output": "y", "input_sise": 512})
    with pytest.raises(ValueError, match="input_size=500"):
        dataclass_from(EncodeConfig, {"input": "x", "output": "y", "input_size": 500})
    with pytest.raises(ValueError, match="hr_max_side=256"):
        dataclass_from(EncodeConfig, {"input": "x", "output": "y", "hr_max_side": 256})
    with pytest.raises(ValueError, match="encode config: output must be set"):
        dataclass_from(EncodeConfig, {"input": "x"})
    with pytest.raises(ValueError, match="no such file"):
        run_encode(config(tmp_path / "nowhere", tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \.tar files"):
        run_encode(config(tmp_path / "empty", tmp_path / "out"))


def test_several_crops_per_image_each_keyed_and_seeded(photo_dir):
    from pipelines.encode import prepare_batch

    cfg = dataclass_from(EncodeConfig, {"input": "x", "output": "y", "input_size": 64, "min_side": 256,
                                     "crops_per_image": 3, "hr_max_side": 512})
    batch = {"__key__": np.array(["a", "b"], dtype=object), "__url__": np.array(["s.tar", "s.tar"], dtype=object),
             "jpg": np.array([(photo_dir / "rocket.jpg").read_bytes(), b""], dtype=object)}
    out = prepare_batch(batch, cfg)
    assert list(out["key"]) == ["a_0", "a_1", "a_2", "b"]  # a broken image is one skipped row, not three
    assert list(out["crop"]) == [0, 1, 2, 0] and list(out["skip_reason"]) == ["", "", "", "empty"]
    boxes = {tuple(box) for box in out["crop_box"][:3]}
    assert len(boxes) == 3  # three different crops ...
    again = prepare_batch(batch, cfg)
    assert [tuple(b) for b in again["crop_box"]] == [tuple(b) for b in out["crop_box"]]  # ... the same on a rerun


def test_an_actor_encodes_a_whole_shard_in_vae_batches_of_batch_size(photo_dir, shards, tiny_vae, tmp_path):
    """ShardEncoder, as one Ray Data actor runs it (here in this process): a shard of samples with 3 crops each goes
    to the VAE `batch_size` rows at a time (its activations grow with the batch), and every crop is written."""
    from pipelines.encode import ShardEncoder

    directory, _ = shards
    cfg = dataclass_from(EncodeConfig, config(directory, tmp_path, crops_per_image=3, batch_size=2))
    _, shape, _ = resolve_vae(cfg)
    actor = ShardEncoder(cfg, pafs.LocalFileSystem(), pafs.LocalFileSystem(), shape)
    seen = []
    encode = actor.encoder
    actor.encoder = lambda rows: seen.append(len(rows["key"])) or encode(rows)
    stats = actor.encode_shard(str(directory / "00000.tar"), str(tmp_path / "00000.parquet"))
    assert max(seen) <= 2 and sum(seen) == 3 * 3 + 2  # 3 good samples × 3 crops, 2 broken ones a row each
    assert (stats["images_in"], stats["encoded"]) == (5, 9)
    assert read_shards(pafs.LocalFileSystem(), [str(tmp_path / "00000.parquet")]).num_rows == 9


def test_member_names_variants_and_other_formats_are_not_missing(photo_dir, tmp_path):
    """`key.v2.jpg` and `key.JPG` are images (a naming variant: the last suffix says the format); `key.gif` is
    present but not a format img2dataset writes: unsupported_format, never missing_image."""
    import tarfile

    from pipelines.encode import prepare_batch, read_tar_samples, sample_batches

    jpg = (photo_dir / GOOD[0]).read_bytes()
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    members = {"00000004.v2.jpg": jpg, "00000005.JPG": jpg, "00000006.gif": gif.getvalue(), "00000007.txt": b"x"}
    with tarfile.open(tmp_path / "odd.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = dataclass_from(EncodeConfig, config(tmp_path, tmp_path / "out"))
    batch = next(sample_batches(read_tar_samples(pafs.LocalFileSystem(), str(tmp_path / "odd.tar")), 8))
    rows = prepare_batch(batch, cfg)
    reasons = dict(zip(rows["key"], rows["skip_reason"]))
    assert reasons == {"00000004": "", "00000005": "", "00000006": "unsupported_format", "00000007": "missing_image"}


def test_any_format_under_a_jpg_member_decodes_by_its_content(tmp_path):
    """The download stage stores originals under `key.jpg` whatever their format: the bytes say what they are. A
    16-bit PNG, a float TIFF, RGBA and transparent-palette PNGs, WebP, GIF and BMP give to_rgb's pixels of the file
    (never OpenCV's white or black); EPS (Ghostscript) and PCX, formats Pillow opens but the web does not serve,
    are unsupported_format."""
    from pipelines.encode import DECODED_FORMATS, prepare_batch

    write_odd_images(tmp_path, (96, 64))
    files = {name: (tmp_path / name).read_bytes() for name in ODD_IMAGES}
    colour = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), np.uint8))
    for fmt, options in (("WEBP", {"lossless": True}), ("GIF", {}), ("BMP", {}), ("EPS", {}), ("PCX", {})):
        buffer = io.BytesIO()
        colour.save(buffer, format=fmt, **options)
        files[fmt] = buffer.getvalue()
    assert files["ramp16.png"].startswith(b"\x89PNG") and "EPS" not in DECODED_FORMATS
    cfg = dataclass_from(EncodeConfig, {"input": "x", "output": "y", "input_size": 32, "min_side": 32,
                                        "hr_max_side": 128})
    batch = {"__key__": np.array(list(files), dtype=object), "__url__": np.array(["s.tar"] * len(files), dtype=object),
             "jpg": np.array(list(files.values()), dtype=object)}
    rows = prepare_batch(batch, cfg)
    reasons = dict(zip(rows["key"], rows["skip_reason"]))
    assert reasons == {**{name: "" for name in files}, "EPS": "unsupported_format", "PCX": "unsupported_format"}
    for i, name in enumerate(rows["key"]):
        if reasons[name]:
            continue
        hr = np.asarray(Image.open(io.BytesIO(rows["hr"][i])))
        expected = np.asarray(to_rgb(Image.open(io.BytesIO(files[name]))).crop(tuple(rows["crop_box"][i])))
        np.testing.assert_array_equal(hr, expected, err_msg=name)
    ramp = np.asarray(decode_image(files["ramp16.png"], max_pixels=10 ** 6))
    assert abs(ramp.mean() - 127.5) < 1.5 and ramp[:, 0].max() <= 1 and ramp[:, -1].min() >= 254
