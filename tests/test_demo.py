"""The demo's code path end to end (what `make demo` runs), at a smaller scale: photos served over HTTP on
127.0.0.1, a real MLflow server, local Ray, filter → download → encode → train → evaluate, one parent MLflow
run with a nested run per stage, every run with its metrics, artifacts and lineage tags."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs.config import load_job_config
from pipelines.demo import run_demo
from pipelines.services import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:LPIPS with a RANDOM")]

SMALL = [
    "stages.encode.overrides.crops_per_image=3",
    "stages.train.overrides.train.steps=8", "stages.train.overrides.train.checkpoint_every=4",
    "stages.train.overrides.train.log_every=4", "stages.train.overrides.train.sample_every=8",
    "stages.train.overrides.train.sizes=[64,128]",
    "stages.evaluate.overrides.resolutions=[128,256]", "stages.evaluate.overrides.limit=4",
    "stages.evaluate.overrides.patches.size=64", "stages.evaluate.overrides.patches.shift=32",
    "figure_sizes=[128x128,256x128]",
]


def test_demo_runs_every_stage_under_one_parent_run(ray_local, tmp_path, capsys):
    cfg = load_job_config(ROOT / "conf/demo.yaml", [f"output={tmp_path / 'demo'}", f"site_port={free_port()}", *SMALL])
    result = run_demo(cfg)

    assert list(result.stages) == ["filter", "download", "encode", "train", "evaluate"]
    download = result.stages["download"].stats
    assert download["success"] == 11 and download["failed"] == 3  # 11 photos; truncated, html, 404
    assert result.stages["filter"].stats["rows_out"] == 14  # 19 rows: 5 dropped by the filters
    assert (tmp_path / "demo" / "decoded_sizes.png").stat().st_size > 1000
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
