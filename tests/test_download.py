"""Stage 2 (download): real img2dataset against an HTTP server on 127.0.0.1, offline.

What img2dataset 1.47 does with each input (asserted below, through this stage's error kinds). The bytes are
stored as downloaded (disable_all_reencoding): nothing is decoded here, so every body the server sends is a
success, named key.jpg whatever it is; the encode stage decodes it and counts what it cannot use
(tests/test_encode.py, tests/test_pipeline_e2e.py: the same files, the reasons in brackets):
  8 photos over 2 MP           success, JPEG bytes as served
  truncated.jpg (half a JPEG)  success, stored as served                                  (encode: corrupt)
  html.jpg (HTML as .jpg)      success, stored as served                                  (encode: not_an_image)
  empty.jpg (0 bytes)          success, a 0-byte key.jpg                                  (encode: empty)
  bomb.png (20000² PNG)        success, its few KB of PNG as key.jpg                      (encode: decompression_bomb)
  tiny.jpg (40×30, says 2000×1500)  success                                               (encode: too_small)
  missing.jpg                  failed_to_download "HTTP Error 404: File not found"        → http_404
  a closed port                failed_to_download "<urlopen error [Errno 111] Connection refused>" → connection
  a port that never answers    failed_to_download "timed out"                             → timeout
  "not a url"                  failed_to_download "unknown url type: 'not a url'"         → invalid_url
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.sample_data import LARGE_PHOTOS, MISSING, laion_table, serve, write_odd_images, write_photos
from pipelines.config import dataclass_from
from pipelines.download import DownloadConfig, _locate, classify_error, resize_options, run_download
from pipelines.filter import OUTPUT_SCHEMA as FILTER_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
GOOD = [f"{name}.jpg" for name in LARGE_PHOTOS]
# bodies that are no usable image, stored as downloaded: the encode stage counts them (until issue 13 they were
# download failures: decode 2, empty 1, too_large 1, too_small 1)
STORED_BROKEN = ["truncated.jpg", "html.jpg", "empty.jpg", "bomb.png", "tiny.jpg"]
EXPECTED_FAILURES = {"connection": 1, "http_404": 1, "invalid_url": 1, "timeout": 1}
SUCCESS = len(GOOD) + len(STORED_BROKEN)  # 13
ROWS = SUCCESS + sum(EXPECTED_FAILURES.values())  # 17


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Served photos + broken files, and a filter-stage-shaped output (two parquet parts + _SUCCESS)."""
    tmp = tmp_path_factory.mktemp("download")
    www = tmp / "www"
    sizes = write_photos(www)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel accepts connections, nobody ever answers: requests time out
    with serve(www) as base:
        urls = {name: f"{base}/{name}" for name in sizes}
        urls["refused"] = f"http://127.0.0.1:{closed.getsockname()[1]}/a.jpg"
        urls["silent"] = f"http://127.0.0.1:{silent.getsockname()[1]}/a.jpg"
        urls["not a url"] = "not a url"
        # the slow row sits in the second shard when shards hold 2 rows: the kill test needs a slow shard
        order = GOOD[:2] + ["silent"] + GOOD[2:] + ["truncated.jpg", "html.jpg", "empty.jpg", "bomb.png",
                                                    "tiny.jpg", MISSING, "refused", "not a url"]
        rows = [{"url": urls[n], "text": f"a photo of {n}", "width": sizes.get(n, (1800, 1200))[0],
                 "height": sizes.get(n, (1800, 1200))[1], "aesthetic": 6.0 + i / 100} for i, n in enumerate(order)]
        filtered, table = filter_output(tmp / "filter" / "abc123", rows, split=9)
        yield {"tmp": tmp, "www": www, "base": base, "input": filtered, "order": order, "table": table,
               "sizes": sizes}
    closed.close()
    silent.close()


def filter_output(directory: Path, rows: list[dict], split: int):
    """A finished filter-stage output of `rows` (laion_table's keys): two parquet parts (rows [:split], [split:])
    + _SUCCESS; returns (directory, table)."""
    table = laion_table(rows, "aesthetic_v1").rename_columns(  # → the filter stage's output schema
        ["url", "caption", "width", "height", "similarity", "hash", "punsafe", "pwatermark", "aesthetic"])
    table = table.select(FILTER_SCHEMA.names).cast(FILTER_SCHEMA)
    directory.mkdir(parents=True)
    pq.write_table(table.slice(0, split), directory / "part-00000.parquet")
    pq.write_table(table.slice(split), directory / "part-00001.parquet")
    (directory / "_SUCCESS").touch()
    return directory, table


def config(world, mlflow_server, **overrides) -> dict:
    # small and quick: one download process, 2 rows per shard (9 shards), short timeout, no per-URL retries
    # (3 s: ample for 127.0.0.1 even on a busy shared machine; the silent port costs it once per attempt)
    return {"input": str(world["input"]), "output": str(world["tmp"] / "out"), "number_sample_per_shard": 2,
            "processes_count": 1, "thread_count": 8, "timeout": 3, "retries": 0,
            "mlflow": {"tracking_uri": mlflow_server, "experiment": "test-download"}, **overrides}


@pytest.fixture(scope="module")
def first(world, mlflow_server):
    """The first output, made the hard way: the job killed after its first shard, then run again."""
    cfg = config(world, mlflow_server)
    out = Path(cfg["output"])
    overrides = [f"{k}={v}" for k, v in cfg.items() if k != "mlflow"] + [f"mlflow.tracking_uri={mlflow_server}"]
    log = world["tmp"] / "killed_job.log"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.download", "--config", "conf/data/download.yaml", *overrides],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), start_new_session=True)  # its own group: kill its workers too
    try:
        deadline = time.time() + 300  # generous: a shared machine can be very busy
        while not list(out.glob("*/shards/*_stats.json")):
            assert proc.poll() is None and time.time() < deadline, f"no shard finished:\n{log.read_text()[-3000:]}"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # mid-way: shard 1 waits 3 s on the silent port
        proc.wait()
    root = next(out.iterdir())
    world["killed"] = {"shards_done": len(list(root.glob("shards/*_stats.json"))),
                       "complete": (root / "_SUCCESS").exists()}
    return run_download(cfg)


def samples(root: Path) -> dict[str, dict[str, bytes]]:
    """Every sample in every tar: key → {extension: bytes}; a key seen twice fails."""
    found: dict[str, dict[str, bytes]] = {}
    for tar in sorted((root / "shards").glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = t.extractfile(m).read()
        assert not set(members) & set(found), f"keys in more than one tar: {set(members) & set(found)}"
        found.update(members)
    return found


def records(root: Path) -> list[dict]:
    """Every shard parquet row (one per row per attempt)."""
    return [r for p in sorted((root / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def check_complete(root: Path, success: int, failures: dict) -> dict:
    stats = json.loads((root / "_stats.json").read_text())
    assert (root / "_SUCCESS").exists()
    assert (stats["rows"], stats["success"], stats["failures"]) == (ROWS, success, failures)
    assert stats["rows"] == stats["success"] + sum(stats["failures"].values())
    found = samples(root)
    row_ids = [json.loads(s["json"])["row_id"] for s in found.values()]
    assert len(found) == success and len(set(row_ids)) == success  # each downloaded row once, no duplicates
    failed = pq.read_table(root / "failed.parquet").to_pylist()
    assert len(failed) == sum(failures.values()) and not {r["row_id"] for r in failed} & set(row_ids)
    return stats


def test_exact_counts_tar_members_and_failed_rows(world, first):
    root = Path(first.output)
    assert root.parent == world["tmp"] / "out" and not first.skipped
    stats = check_complete(root, SUCCESS, EXPECTED_FAILURES)
    assert len(stats["shards"]) == 9  # 9 + 8 rows in two input files, 2 per shard → 5 + 4 shards
    found = samples(root)
    for key, sample in found.items():
        assert set(sample) == {"jpg", "txt", "json"}, key  # `jpg` whatever the bytes (bomb.png: a PNG)
        meta = json.loads(sample["json"])
        name = world["order"][meta["row_id"]]
        assert sample["jpg"] == (world["www"] / name).read_bytes()  # the bytes as downloaded, whatever they are
        assert meta["sha256"] == hashlib.sha256(sample["jpg"]).hexdigest()  # so the hash is the stored bytes'
        assert sample["txt"].decode() == f"a photo of {name}" == meta["caption"]
        assert meta["width"] is meta["height"] is meta["original_width"] is None  # nothing decoded here
        assert (meta["src_width"], meta["src_height"]) == world["sizes"][name]  # the input's sizes
        assert meta["aesthetic"] == pytest.approx(6.0 + meta["row_id"] / 100)
        assert {"punsafe", "pwatermark", "similarity", "hash", "sha256", "key", "status"} <= set(meta)
    names = sorted(world["order"][json.loads(s["json"])["row_id"]] for s in found.values())
    assert names == sorted(GOOD + STORED_BROKEN)
    assert next(s for s in found.values() if json.loads(s["json"])["url"].endswith("/bomb.png"))["jpg"][:4] == \
        b"\x89PNG"
    shard_rows = [r for r in records(root) if r["status"] == "success"]
    assert len(shard_rows) == SUCCESS and all(r["width"] is None for r in shard_rows)

    failed = {world["order"][r["row_id"]]: r for r in pq.read_table(root / "failed.parquet").to_pylist()}
    assert {n: r["error_kind"] for n, r in failed.items()} == {
        "silent": "timeout", MISSING: "http_404", "refused": "connection", "not a url": "invalid_url"}
    assert failed[MISSING]["error_message"] == "HTTP Error 404: File not found"
    assert "Connection refused" in failed["refused"]["error_message"]
    row = failed[MISSING]  # the input's own column names and values come back, ready to be fed again
    assert list(row)[:6] == ["url", "caption", "row_id", "error_kind", "error_message", "attempts"]
    assert (row["width"], row["height"], row["attempts"]) == (1800, 1200, 1)
    assert row["url"] == world["table"].column("url")[row["row_id"]].as_py()
    assert {"aesthetic", "punsafe", "pwatermark", "similarity", "hash"} <= set(row)


def test_rerun_is_idempotent(world, mlflow_server, first):
    root = Path(first.output)
    before = {p.name: p.stat().st_mtime_ns for p in (root / "shards").iterdir()}
    again = run_download(config(world, mlflow_server))
    assert again.skipped and again.output == first.output and again.stats == first.stats
    assert {p.name: p.stat().st_mtime_ns for p in (root / "shards").iterdir()} == before


def test_mlflow_run(first, mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    run = client.get_run(first.run_id)
    assert run.data.metrics["success"] == SUCCESS and run.data.metrics["failures.http_404"] == 1
    assert run.data.metrics["rows"] == ROWS and run.data.params["number_sample_per_shard"] == "2"
    assert run.data.tags["infgen.output"] == first.output and run.data.tags["mlflow.runName"] == "download"
    assert {a.path for a in client.list_artifacts(first.run_id)} == {"download_stats.json", "failed.parquet"}


def test_killed_run_resumes_with_every_row_once(world, first):
    assert not world["killed"]["complete"] and 0 < world["killed"]["shards_done"] < 9
    root = Path(first.output)
    assert not first.skipped and len(first.stats["shards"]) == 9
    assert sorted(Counter(r["row_id"] for r in records(root)).values()) == [1] * ROWS  # the killed shard redone once


def test_retry_failed_recovers_and_keeps_counts_exact(world, mlflow_server, first, ray_local):
    from mlflow.tracking import MlflowClient

    # the retries run on the Ray distributor (the cluster setting): same output, same accounting
    root = Path(first.output)
    shutil.copy(world["www"] / "rocket.jpg", world["www"] / MISSING)  # the 404 is now served
    try:
        result = run_download(config(world, mlflow_server, retry_failed=True, distributor="ray"))
    finally:
        (world["www"] / MISSING).unlink()
    assert result.output == first.output and not result.skipped
    rest = {k: v for k, v in EXPECTED_FAILURES.items() if k != "http_404"}
    stats = check_complete(root, SUCCESS + 1, rest)
    assert stats["rounds"] == [{"input": "retry-001.parquet", "rows": 4, "shards": 2, "success": 1}]
    assert len(stats["shards"]) == 11  # 9 main + 2 for the round's 4 rows
    recovered = [s for s in samples(root).values() if world["order"][json.loads(s["json"])["row_id"]] == MISSING]
    assert len(recovered) == 1 and recovered[0]["jpg"] == (world["www"] / "rocket.jpg").read_bytes()
    failed = pq.read_table(root / "failed.parquet").to_pylist()
    assert {r["attempts"] for r in failed} == {2} and len(failed) == ROWS - SUCCESS - 1
    run = MlflowClient(mlflow_server).get_run(result.run_id)
    assert run.data.metrics["success"] == SUCCESS + 1 and "failures.http_404" not in run.data.metrics

    # feeding failed.parquet back as the input means the same as retry_failed=true: same output, a retry
    # (not downloaded again here: each img2dataset call costs ~10 s of process start-up on this machine)
    located = _locate(dataclass_from(DownloadConfig, config(world, mlflow_server, input=str(root / "failed.parquet"))))
    assert (located.uri, located.from_failed, located.params) == (first.output, True, first.stats["params"])


def test_max_long_side_shrinks_like_every_stage_decodes_and_counts_what_it_cannot(world, mlflow_server):
    """With max_long_side, ShrinkResizer replaces img2dataset's OpenCV resizer: an image over the cap is decoded by
    to_rgb (a 16-bit PNG and a float TIFF give grey ramps, not OpenCV's white and black JPEGs; alpha on white;
    EXIF orientation applied), shrunk and stored as JPEG; bodies within the cap or that are no image Pillow knows are
    stored as downloaded; an image over the cap that cannot be decoded fails under the encode stage's reason."""
    from PIL import Image

    from infgen.images import to_rgb
    from pipelines.encode import decode_image

    www = world["www"]
    odd = write_odd_images(www, (640, 480))
    tall = Image.new("RGB", (400, 300), (30, 120, 200))
    exif = tall.getexif()
    exif[0x0112] = 6  # stored 400×300, shown rotated: 300×400
    tall.save(www / "rotated.jpg", exif=exif)
    names = [*odd, "chelsea.jpg", "rotated.jpg", "tiny.jpg", "html.jpg", "truncated.jpg", "bomb.png"]
    rows = [{"url": f"{world['base']}/{n}", "text": n, "width": 2000, "height": 1500} for n in names]
    filtered, _ = filter_output(world["tmp"] / "filter" / "capped", rows, split=5)
    result = run_download(config(world, mlflow_server, input=str(filtered), output=str(world["tmp"] / "capped"),
                                 max_long_side=320))
    stats = result.stats
    assert (stats["rows"], stats["success"], stats["failures"]) == (10, 8, {"corrupt": 1, "decompression_bomb": 1})
    stored = {json.loads(s["json"])["url"].rsplit("/", 1)[1]: s for s in samples(Path(result.output)).values()}
    assert sorted(stored) == sorted(names[:-2])
    for name in [*odd, "chelsea.jpg", "rotated.jpg"]:  # over the cap: to_rgb, shrunk, JPEG
        meta, data = json.loads(stored[name]["json"]), stored[name]["jpg"]
        original = to_rgb(Image.open(www / name))
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and (meta["width"], meta["height"]) == image.size, name
        assert max(image.size) == 320 and (meta["original_width"], meta["original_height"]) == original.size
        expected = np.asarray(original.resize(image.size, Image.BOX), np.float32)
        assert np.abs(np.asarray(decode_image(data, None), np.float32) - expected).mean() < 3, name
    assert Image.open(io.BytesIO(stored["rotated.jpg"]["jpg"])).size == (240, 320)  # upright: OpenCV's was not
    for name in ("ramp16.png", "ramp_float.tif"):
        ramp = np.asarray(decode_image(stored[name]["jpg"], None))
        assert abs(ramp.mean() - 127.5) < 2 and ramp[:, 0].max() <= 4 and ramp[:, -1].min() >= 251, name
    for name in ("tiny.jpg", "html.jpg"):  # within the cap, or no image Pillow knows: as downloaded
        assert stored[name]["jpg"] == (www / name).read_bytes() and json.loads(stored[name]["json"])["width"] is None
    failed = {r["url"].rsplit("/", 1)[1]: r for r in pq.read_table(Path(result.output) / "failed.parquet").to_pylist()}
    assert {n: (r["error_kind"], r["error_message"]) for n, r in failed.items()} == {
        "truncated.jpg": ("corrupt", "image refused: corrupt"),
        "bomb.png": ("decompression_bomb", "image refused: decompression_bomb")}


def test_input_without_success_marker_is_refused(world, mlflow_server, tmp_path):
    unfinished = tmp_path / "filter"
    unfinished.mkdir()
    pq.write_table(world["table"], unfinished / "part-00000.parquet")
    with pytest.raises(ValueError, match=r"filter.* has no _SUCCESS"):
        run_download(config(world, mlflow_server, input=str(unfinished)))
    (unfinished / "_SUCCESS").touch()
    with pytest.raises(ValueError, match=r"part-00000.parquet: no column 'URL' \(url_col\)"):
        run_download(config(world, mlflow_server, input=str(unfinished), url_col="URL"))
    with pytest.raises(ValueError, match="unknown keys.*'timeout_s'"):
        run_download(config(world, mlflow_server, timeout_s=3))


def test_error_kinds_and_resize_options():
    assert classify_error("HTTP Error 403: Forbidden") == "http_403"
    assert classify_error("<urlopen error [Errno -2] Name or service not known>") == "connection"
    assert classify_error("<urlopen error timed out>") == "timeout"
    assert classify_error("image refused: decompression_bomb") == "decompression_bomb"  # ShrinkResizer's
    assert classify_error("image refused: error_MemoryError: ") == "error_MemoryError"
    assert classify_error("Use of image disallowed by X-Robots-Tag directive") == "disallowed"
    assert classify_error("something new") == classify_error(None) == "other"
    assert resize_options(None) == {"resize_mode": "no", "disable_all_reencoding": True}
    capped = resize_options(1024)  # long side set to 1024, only for images whose long side is larger
    assert (capped["resize_mode"], capped["resize_only_if_bigger"], capped["image_size"]) == ("keep_ratio_largest",
                                                                                              True, 1024)
    with pytest.raises(ValueError, match=r"unknown keys \['min_image_size'\]"):  # encode's min_side does it
        dataclass_from(DownloadConfig, {"input": "x", "min_image_size": 1024})
    with pytest.raises(ValueError, match="encode_format='gif'"):
        dataclass_from(DownloadConfig, {"input": "x", "encode_format": "gif"})


def test_yaml_matches_defaults():
    from dataclasses import asdict

    from omegaconf import OmegaConf

    yaml = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/data/download.yaml"))
    assert yaml["input"] is None  # required: the config's own default is a stand-in here
    assert yaml == {**asdict(DownloadConfig(input="stand-in")), "input": None}
