"""The demo's code path end to end (what `make demo` runs), at a smaller scale: photos served over HTTP on
127.0.0.1, a real MLflow server, local Ray, filter → download → encode → train → evaluate, one parent MLflow
run with a nested run per stage, every run with its metrics, artifacts and lineage tags, and the split by file:
the evaluation scores only crops of the held-out files. The small photos Python packages ship stand in for the
wallpapers (tests/test_sample_data.py checks those at the real thresholds), with thresholds lowered to match."""

import csv
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from infgen.photos import load_shipped_photos
from jobs.config import load_job_config
from pipelines.common import resolve_files
from pipelines.demo import run_demo
from pipelines.services import free_port
from pipelines.shards import read_rows

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:LPIPS with a RANDOM")]

SMALL = [
    "photos=shipped",
    "stages.encode.overrides.crops_per_image=3",
    "stages.train.overrides.train.steps=8", "stages.train.overrides.train.checkpoint_every=4",
    "stages.train.overrides.train.log_every=4", "stages.train.overrides.train.sample_every=8",
    "stages.train.overrides.train.sizes=[96,128]",  # views: 64-px windows of every output
    "stages.evaluate.overrides.resolutions=[128,256]", "stages.evaluate.overrides.limit=4",
    "stages.evaluate.overrides.patches.size=64", "stages.evaluate.overrides.patches.shift=32",
    "figure_sizes=[128x128,256x128]",
]
# the shipped photos are 0.13–2 MP, 300–1411 px: below the real thresholds the demo runs at (the real size is
# checked by the encode stage, whose min_side is the demo's 256 already)
SHIPPED_THRESHOLDS = {"stages": {"filter": {"overrides": {"min_pixels": 100_000, "min_short_side": 256}}}}


def test_demo_runs_every_stage_under_one_parent_run(ray_local, tmp_path, capsys):
    cfg = load_job_config(ROOT / "conf/demo.yaml", [f"output={tmp_path / 'demo'}", f"site_port={free_port()}", *SMALL])
    cfg = OmegaConf.merge(cfg, SHIPPED_THRESHOLDS)
    result = run_demo(cfg)

    assert list(result.stages) == ["filter", "download", "encode", "train", "evaluate"]
    download = result.stages["download"].stats
    # 11 photos + truncated and html stored as downloaded (encode counts them); the 404 fails here
    assert download["success"] == 13 and download["failed"] == 1
    assert result.stages["encode"].stats["skipped"] == {"corrupt": 1, "not_an_image": 1}
    assert result.stages["filter"].stats["rows_out"] == 14  # 19 rows: 5 dropped by the filters
    assert (tmp_path / "demo" / "decoded_sizes.png").stat().st_size > 1000

    # the split by file: the evaluation scored crops of the held-out photos (coffee, chelsea, flower) only
    held = {p.path.name for p in load_shipped_photos("holdout")}
    urls = read_rows(*resolve_files(result.stages["encode"].output), ["key", "url"]).to_pydict()
    file_of = {k: u.rsplit("/", 1)[1] for k, u in zip(urls["key"], urls["url"])}
    with open(Path(result.stages["evaluate"].output) / "per_image.csv") as f:
        scored = {row["key"] for row in csv.DictReader(f)}
    assert len(scored) == 4 and {file_of[k] for k in scored} <= held
    # the evaluation took the split from the trained model's record (holdout.json), and it scored no trained row
    split = result.stages["evaluate"].stats["holdout"]
    assert (split["source"], split["trained_rows"]) == ("model record", 0) and "URLs listed" in split["split"]
    out = capsys.readouterr().out
    assert "Open the UI:" in out and "mlflow server --backend-store-uri sqlite:///" in out
    assert "fidp" in out and "vae_bicubic" in out

    # the server is gone with the demo: read its SQLite store directly
    client = MlflowClient(f"sqlite:///{tmp_path / 'demo' / 'mlflow' / 'mlflow.db'}")
    parent = client.get_run(result.run_ids["pipeline"])
    assert parent.info.status == "FINISHED" and parent.data.tags["infgen.stage"] == "pipeline"
    for stage in result.stages:
        run = client.get_run(result.run_ids[stage])
        tags = run.data.tags
        assert run.info.status == "FINISHED", stage
        assert tags["mlflow.parentRunId"] == parent.info.run_id, stage
        assert run.info.experiment_id == parent.info.experiment_id
        assert {"infgen.input", "infgen.output", "infgen.config_hash", "infgen.git_commit"} <= set(tags), stage
        assert tags["infgen.stage"] == stage and run.data.metrics, stage
    evaluation = client.get_run(result.run_ids["evaluate"])
    assert "fidp/infgen/256" in evaluation.data.metrics and "psnr/vae_bicubic/128" in evaluation.data.metrics
    # the evaluation is linked to the model version it scored; infgen's numbers show on that model's page
    version = client.get_model_version("infgen-demo", "1")
    assert evaluation.data.tags["infgen.model_version"] == "1" and version.run_id == result.run_ids["train"]
    from pipelines.tracking import logged_model_id

    assert "psnr/infgen/128" in {m.key for m in client.get_logged_model(logged_model_id(version)).metrics}

    # the trained model is registered as an MLflow model: with the demo's server up again, it decodes at 1024×768
    import mlflow
    import numpy as np

    from pipelines.services import mlflow_server

    with mlflow_server(tmp_path / "demo" / "mlflow") as uri:
        mlflow.set_tracking_uri(uri)
        model = mlflow.pyfunc.load_model("models:/infgen-demo@newest")
        latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
        assert model.predict(latents, params={"height": 768, "width": 1024}).shape == (1, 768, 1024, 3)

    # a rerun finds every stage complete: it says so and adds no run and no model version
    runs = len(client.search_runs([parent.info.experiment_id]))
    again = run_demo(cfg)
    assert all(out.skipped for out in again.stages.values()), {s: out.skipped for s, out in again.stages.items()}
    assert again.run_ids["pipeline"] is None
    assert len(client.search_runs([parent.info.experiment_id])) == runs
    assert len(client.search_model_versions("name='infgen-demo'")) == 1
    assert "every stage was complete already" in capsys.readouterr().out
