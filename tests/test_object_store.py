"""Object storage end to end (issue 11): filter → download → encode with every input and output at s3:// on a real
S3-API server (moto) on 127.0.0.1, the URIs keeping their scheme from stage to stage; a killed encode on S3 reruns
with no duplicate and no missing shard. (The evaluate stage on S3: tests/test_evaluate.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.common import SUCCESS
from pipelines.download import run_download
from pipelines.encode import run_encode
from pipelines.filter import run_filter
from pipelines.sample_data import LARGE_PHOTOS, serve, write_laion_parquet, write_photos

ROOT = Path(__file__).resolve().parents[1]


def upload(local: Path, uri: str) -> None:
    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def listing(uri: str, suffix: str) -> list[str]:
    fs, path = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def test_filter_download_encode_on_s3(ray_local, s3, tmp_path, tiny_vae, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stage that mistook a URI for a local path would write ./s3:/...
    bucket = s3("infgen-e2e")
    tracking = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "s3"}
    sizes = write_photos(tmp_path / "www")
    with serve(tmp_path / "www") as base:
        rows = [{"url": f"{base}/{name}", "text": name, "width": w, "height": h, "aesthetic": 6.5}
                for name, (w, h) in sizes.items() if name.split(".")[0] in LARGE_PHOTOS]
        rows.append({"url": f"{base}/small.jpg", "text": "small", "width": 800, "height": 600, "aesthetic": 6.5})
        write_laion_parquet(tmp_path / "laion" / "part-0.parquet", rows, "aesthetics_v2")
        upload(tmp_path / "laion" / "part-0.parquet", f"{bucket}/laion/part-0.parquet")

        filtered = run_filter({"input": f"{bucket}/laion", "output": f"{bucket}/filter", "allow_private_hosts": True,
                               "min_short_side": 1024, "mlflow": tracking})
        assert filtered.output.startswith(f"{bucket}/filter/")
        assert (filtered.stats["rows_in"], filtered.stats["rows_out"]) == (len(rows), len(LARGE_PHOTOS))
        assert listing(filtered.output, SUCCESS)

        downloaded = run_download({"input": filtered.output, "output": f"{bucket}/download",
                                   "number_sample_per_shard": 3, "processes_count": 1, "timeout": 5, "retries": 0,
                                   "mlflow": tracking})
    assert downloaded.output.startswith(f"{bucket}/download/")
    assert downloaded.stats["success"] == len(LARGE_PHOTOS)
    shards = listing(f"{downloaded.output}/shards", ".tar")
    assert len(shards) == 3

    config = {"input": f"{downloaded.output}/shards", "output": f"{bucket}/encoded", "vae": "tiny",
              "input_size": 128, "min_side": 512, "hr_max_side": 512, "hr_format": "jpeg", "batch_size": 2,
              "grid_samples": 2, "mlflow": tracking}
    encoded = run_encode(config)
    assert encoded.output.startswith(f"{bucket}/encoded/")
    assert (encoded.stats["images_in"], encoded.stats["encoded"]) == (len(LARGE_PHOTOS), len(LARGE_PHOTOS))
    fs, path = pafs.FileSystem.from_uri(encoded.output)
    table = pq.read_table(path, filesystem=fs)
    assert sorted(table.column("key").to_pylist()) == sorted(set(table.column("key").to_pylist()))
    assert table.num_rows == len(LARGE_PHOTOS)
    assert run_encode({**config, "mlflow": {"enabled": False}}).skipped

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("s3").experiment_id])
    assert {r.info.run_name: r.data.tags["infgen.output"] for r in runs} == {
        "filter": filtered.output, "download": downloaded.output, "encode": encoded.output}
    assert not list(tmp_path.glob("s3:*")) and not (ROOT / "s3:").exists()

    # a crash mid-run, on S3: the rerun finishes every shard once
    output = f"{bucket}/killed"
    args = [f"{k}={v}" for k, v in {**config, "output": output, "batch_size": 1}.items() if k not in ("mlflow",)]
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.encode", "--config", "conf/data/encode.yaml", *args,
                             "mlflow.enabled=false"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not listing(output, ".parquet") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    done = listing(output, ".parquet")
    assert 1 <= len(done) < len(shards) and not listing(output, SUCCESS), stderr.decode()[-3000:]

    again = run_encode({**config, "output": output, "batch_size": 1, "mlflow": {"enabled": False}})
    assert again.stats["last_run"]["shards_resumed"] >= 1
    table = pq.read_table(pafs.FileSystem.from_uri(again.output)[1], filesystem=fs)
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(set(keys)) and len(keys) == len(LARGE_PHOTOS)
    assert json.loads(fs.open_input_stream(f"{pafs.FileSystem.from_uri(again.output)[1]}/_stats.json").read())[
        "encoded"] == len(LARGE_PHOTOS)

    # training reads its data from S3 as well (its checkpoints and model stay on a POSIX path)
    from omegaconf import OmegaConf

    from pipelines.train import run_train

    cfg = OmegaConf.load(ROOT / "conf/train/local.yaml")
    cfg.data, cfg.output, cfg.vae = encoded.output, str(tmp_path / "train"), "tiny"
    cfg.mlflow.tracking_uri, cfg.mlflow.registered_model_name = tracking["tracking_uri"], None
    cfg.samples.count, cfg.samples.sizes = 1, [[64, 64]]
    cfg.train.update({"steps": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "sample_every": 2,
                      "sizes": [64, 128], "num_workers": 1})
    trained = run_train(cfg)
    assert trained.metrics["step"] == 2 and Path(trained.model_dir, "model.safetensors").is_file()

    # and the evaluation of that model on the S3 shards, its results (and reference cache) on S3 too
    from pipelines.evaluate import run_evaluate

    ecfg = OmegaConf.load(ROOT / "conf/eval/local.yaml")
    ecfg.model, ecfg.data, ecfg.output = trained.model_dir, encoded.output, f"{bucket}/eval"
    ecfg.vae, ecfg.mlflow.tracking_uri, ecfg.resolutions, ecfg.grid.count = "tiny", tracking["tracking_uri"], [128], 1
    ecfg.workers.num_actors = 1
    evaluated = run_evaluate(ecfg)
    # the rows conf/train/local.yaml's split held out (10% by URL hash), as the model's record says
    from pipelines.holdout import RECORD, HoldoutRecord

    held_out = HoldoutRecord.read(Path(trained.model_dir) / RECORD).held_out_rows
    assert evaluated.output.startswith(f"{bucket}/eval/") and evaluated.stats["samples"] == held_out > 0
    assert listing(evaluated.output, SUCCESS) and listing(evaluated.output, "results.json")
    assert not list(tmp_path.glob("s3:*")) and not (ROOT / "s3:").exists()
