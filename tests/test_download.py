"""Stage 2 (download): real img2dataset against an HTTP server on 127.0.0.1, offline.

What img2dataset 1.47 does with each input (asserted below, through this stage's error kinds):
  8 photos over 2 MP           success, JPEG bytes kept as served (skip_reencode)
  truncated.jpg (half a JPEG)  failed_to_resize "Image decoding error"                    → decode
  html.jpg (HTML as .jpg)      failed_to_resize "Image decoding error"                    → decode
  empty.jpg (0 bytes)          failed_to_resize "OpenCV(...) (-215:Assertion failed) !buf.empty() in function
                               'imdecode_'"                                               → empty
  bomb.png (20000² PNG)        failed_to_resize "... pixels <= CV_IO_MAX_IMAGE_PIXELS in function
                               'validateInputImageSize'" (this stage sets OPENCV_IO_MAX_IMAGE_PIXELS;
                               without it OpenCV decodes the bomb and img2dataset *accepts* it as a
                               20000×20000 image unless max_image_area is set)             → too_large
  tiny.jpg (40×30, says 2000×1500)  accepted by img2dataset itself; "image too small" with
                               min_image_size (this stage's default 1024)                 → too_small
  missing.jpg                  failed_to_download "HTTP Error 404: File not found"        → http_404
  a closed port                failed_to_download "<urlopen error [Errno 111] Connection refused>" → connection
  a port that never answers    failed_to_download "timed out"                             → timeout
  "not a url"                  failed_to_download "unknown url type: 'not a url'"         → invalid_url
"""

from __future__ import annotations

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

import pyarrow.parquet as pq
import pytest

from pipelines.sample_data import LARGE_PHOTOS, MISSING, laion_table, serve, write_photos
from pipelines.config import dataclass_from
from pipelines.download import DownloadConfig, _locate, classify_error, resize_options, run_download
from pipelines.filter import OUTPUT_SCHEMA as FILTER_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
GOOD = [f"{name}.jpg" for name in LARGE_PHOTOS]
EXPECTED_FAILURES = {"connection": 1, "decode": 2, "empty": 1, "http_404": 1, "invalid_url": 1, "timeout": 1,
                     "too_large": 1, "too_small": 1}
ROWS = len(GOOD) + sum(EXPECTED_FAILURES.values())  # 17


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
        table = laion_table(rows, "aesthetic_v1").rename_columns(  # → the filter stage's output schema
            ["url", "caption", "width", "height", "similarity", "hash", "punsafe", "pwatermark", "aesthetic"])
        table = table.select(FILTER_SCHEMA.names).cast(FILTER_SCHEMA)
        filtered = tmp / "filter" / "abc123"
        filtered.mkdir(parents=True)
        pq.write_table(table.slice(0, 9), filtered / "part-00000.parquet")
        pq.write_table(table.slice(9), filtered / "part-00001.parquet")
        (filtered / "_SUCCESS").touch()
        yield {"tmp": tmp, "www": www, "input": filtered, "order": order, "table": table}
    closed.close()
    silent.close()


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
    stats = check_complete(root, 8, EXPECTED_FAILURES)
    assert len(stats["shards"]) == 9  # 9 + 8 rows in two input files, 2 per shard → 5 + 4 shards
    found = samples(root)
    for key, sample in found.items():
        assert set(sample) == {"jpg", "txt", "json"}, key
        meta = json.loads(sample["json"])
        name = world["order"][meta["row_id"]]
        assert sample["jpg"] == (world["www"] / name).read_bytes()  # originals kept byte for byte
        assert sample["txt"].decode() == f"a photo of {name}" == meta["caption"]
        assert (meta["width"], meta["height"]) == LARGE_PHOTOS[name.removesuffix(".jpg")]
        assert (meta["src_width"], meta["src_height"]) == (meta["width"], meta["height"])  # the input's sizes
        assert meta["aesthetic"] == pytest.approx(6.0 + meta["row_id"] / 100)
        assert {"punsafe", "pwatermark", "similarity", "hash", "sha256", "key", "status"} <= set(meta)
    assert sorted(world["order"][json.loads(s["json"])["row_id"]] for s in found.values()) == sorted(GOOD)

    failed = {world["order"][r["row_id"]]: r for r in pq.read_table(root / "failed.parquet").to_pylist()}
    assert {n: r["error_kind"] for n, r in failed.items()} == {
        "silent": "timeout", "truncated.jpg": "decode", "html.jpg": "decode", "empty.jpg": "empty",
        "bomb.png": "too_large", "tiny.jpg": "too_small", MISSING: "http_404", "refused": "connection",
        "not a url": "invalid_url"}
    assert failed[MISSING]["error_message"] == "HTTP Error 404: File not found"
    assert "Connection refused" in failed["refused"]["error_message"]
    assert "CV_IO_MAX_IMAGE_PIXELS" in failed["bomb.png"]["error_message"]
    row = failed["tiny.jpg"]  # the input's own column names and values come back, ready to be fed again
    assert list(row)[:6] == ["url", "caption", "row_id", "error_kind", "error_message", "attempts"]
    assert (row["width"], row["height"], row["attempts"]) == (2000, 1500, 1)
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
    assert run.data.metrics["success"] == 8 and run.data.metrics["failures.http_404"] == 1
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
    stats = check_complete(root, 9, rest)
    assert stats["rounds"] == [{"input": "retry-001.parquet", "rows": 9, "shards": 5, "success": 1}]
    assert len(stats["shards"]) == 14  # 9 main + 5 for the round's 9 rows
    recovered = [s for s in samples(root).values() if world["order"][json.loads(s["json"])["row_id"]] == MISSING]
    assert len(recovered) == 1 and recovered[0]["jpg"] == (world["www"] / "rocket.jpg").read_bytes()
    failed = pq.read_table(root / "failed.parquet").to_pylist()
    assert {r["attempts"] for r in failed} == {2} and len(failed) == ROWS - 9
    run = MlflowClient(mlflow_server).get_run(result.run_id)
    assert run.data.metrics["success"] == 9 and "failures.http_404" not in run.data.metrics

    # feeding failed.parquet back as the input means the same as retry_failed=true: same output, a retry
    # (not downloaded again here: each img2dataset call costs ~10 s of process start-up on this machine)
    located = _locate(dataclass_from(DownloadConfig, config(world, mlflow_server, input=str(root / "failed.parquet"))))
    assert (located.uri, located.from_failed, located.params) == (first.output, True, first.stats["params"])


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
    assert classify_error("image area too large") == "too_large"
    assert classify_error("Use of image disallowed by X-Robots-Tag directive") == "disallowed"
    assert classify_error("something new") == classify_error(None) == "other"
    assert resize_options(None) == {"resize_mode": "no", "skip_reencode": True, "image_size": 256}
    capped = resize_options(1024)  # long side set to 1024, only for images whose long side is larger
    assert (capped["resize_mode"], capped["resize_only_if_bigger"], capped["image_size"]) == ("keep_ratio_largest",
                                                                                              True, 1024)


def test_yaml_matches_defaults():
    from dataclasses import asdict

    from omegaconf import OmegaConf

    yaml = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/data/download.yaml"))
    assert yaml["input"] is None  # required: the config's own default is a stand-in here
    assert yaml == {**asdict(DownloadConfig(input="stand-in")), "input": None}
