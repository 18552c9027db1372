import socket
import time

from mlflow.tracking import MlflowClient

from pipelines.tracking import Tracker, config_hash, flatten


def test_flatten_and_hash():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": 1, "a.c": "[1, 2]", "d": "x"}
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1}) != config_hash({"a": 2, "b": 2})


def test_logs_params_metrics_artifacts_and_lineage(mlflow_server, tmp_path):
    artifact = tmp_path / "stats.json"
    artifact.write_text('{"rows": 3}')
    with Tracker(mlflow_server, "infgen-test", "unit", tags={"infgen.input": "in/"}) as tracker:
        tracker.log_params({"filter": {"min_pixels": 2_000_000}, "seed": 0})
        tracker.log_metrics({"rows_out": 3}, step=1)
        tracker.log_artifact(artifact)
        tracker.log_dict({"a": 1}, "table.json")
    run = MlflowClient(mlflow_server).get_run(tracker.run_id)
    assert run.data.params == {"filter.min_pixels": "2000000", "seed": "0"}
    assert run.data.metrics == {"rows_out": 3.0}
    assert run.data.tags["infgen.input"] == "in/" and run.data.tags["infgen.git_commit"]
    assert run.info.status == "FINISHED"
    names = {a.path for a in MlflowClient(mlflow_server).list_artifacts(tracker.run_id)}
    assert names == {"stats.json", "table.json"}


def test_unreachable_server_never_raises(caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.time()
    with Tracker(f"http://127.0.0.1:{port}", "x", "y", retries=2, backoff_s=0.01) as tracker:
        first_failure = time.time() - start
        for step in range(50):  # a training loop logging on: skipped cheaply until reconnect_s has passed
            tracker.log_params({"a": 1})
            tracker.log_metrics({"m": 1.0}, step=step)
    assert tracker.run_id is None
    assert "MLflow start run failed" in caplog.text and "logging is skipped" in caplog.text
    assert time.time() - start < first_failure + 5


def test_the_exported_model_is_an_mlflow_pyfunc_model(tmp_path):
    """Logged from a run, registered with the alias: `mlflow.pyfunc.load_model` decodes at a requested size."""
    import mlflow
    import numpy as np
    import torch

    from infgen import InfGen

    model = InfGen.from_preset("tiny").eval()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with Tracker(uri, "infgen-test", "pyfunc") as tracker:
        assert tracker.log_infgen_model(model.save_pretrained(tmp_path / "exported"), "infgen-pyfunc") == "1"
    client = MlflowClient(uri)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert client.get_model_version_by_alias("infgen-pyfunc", "newest").run_id == tracker.run_id
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/infgen-pyfunc/1")
    assert loaded.metadata.metadata["infgen_config"]["width"] == model.config.width
    latents = np.random.default_rng(0).standard_normal((2, 4, 12, 16)).astype(np.float32)
    images = loaded.predict(latents, params={"height": 768 // 8, "width": 1024 // 8})
    expected = ((model.decode(torch.from_numpy(latents), (96, 128)) + 1) * 127.5).round().permute(0, 2, 3, 1)
    assert images.shape == (2, 96, 128, 3) and images.dtype == np.uint8
    assert np.abs(images.astype(int) - expected.numpy().astype(int)).max() <= 1
    assert loaded.predict(latents[:1]).shape == (1, 96, 128, 3)  # no size: the VAE's native 8×


def test_the_holdout_record_of_a_registered_model_is_read_without_its_weights(tmp_path, monkeypatch):
    """The evaluation's driver reads the split a models:/ or runs:/ model was trained with from MLmodel and
    holdout.json alone (the weights are the workers' to fetch); a model logged without a record has none."""
    import mlflow

    from infgen import InfGen
    from pipelines.evaluate.model import holdout_record
    from pipelines.holdout import Holdout, HoldoutRecord

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exported = InfGen.from_preset("tiny").save_pretrained(tmp_path / "exported")
    with Tracker(uri, "infgen-test", "no-record") as tracker:
        tracker.log_infgen_model(exported, "infgen-bare")
    record = HoldoutRecord(Holdout(fraction=0.25, seed=7), "s3://bucket/encoded", ("ab", "cd"), 40, 10, ("k1",))
    record.write(exported)
    with Tracker(uri, "infgen-test", "with-record") as tracker:
        tracker.log_infgen_model(exported, "infgen-split")
    asked = []
    download = mlflow.artifacts.download_artifacts
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda uri, **kw: asked.append(uri) or download(uri, **kw))
    for source in ("models:/infgen-split/1", "models:/infgen-split@newest", f"runs:/{tracker.run_id}/model"):
        asked.clear()
        assert holdout_record(source, uri) == record
        assert [u.rsplit("/", 1)[1] for u in asked] == ["MLmodel", "holdout.json"]
    assert holdout_record("models:/infgen-bare/1", uri) is None


def test_a_run_that_raises_ends_failed_or_killed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for error, status in ((RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")):
        try:
            with Tracker(uri, "infgen-test", "crash") as tracker:
                raise error("stop")
        except error:
            pass
        assert MlflowClient(uri).get_run(tracker.run_id).info.status == status


def test_mlflow_conventions_experiment_kind_git_commit_system_metrics(tmp_path, monkeypatch):
    from pipelines.tracking import git_commit

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # 10 s by default
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with Tracker(uri, "infgen-kind", "conventions", system_metrics=True) as tracker:
        time.sleep(2)
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("infgen-kind").tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.get_run(tracker.run_id)
    assert run.data.tags["mlflow.source.git.commit"] == git_commit() != "unknown"
    assert any(k.startswith("system/") for k in run.data.metrics)


def test_lineage_tags_become_the_runs_datasets(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tags = {"infgen.stage": "train", "infgen.input": "/data/encoded/0123456789abcdef", "infgen.output": "/runs/x"}
    with Tracker(uri, "infgen-datasets", "train-x", tags=tags) as tracker:
        pass
    inputs = MlflowClient(uri).get_run(tracker.run_id).inputs.dataset_inputs
    found = {(d.dataset.name, d.dataset.digest, d.tags[0].value) for d in inputs}
    assert ("train input", "0123456789abcdef", "training") in found
    assert {name for name, _, _ in found} == {"train input", "train output"}


def test_images_are_step_indexed(tmp_path):
    from PIL import Image

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with Tracker(uri, "infgen-images", "images") as tracker:
        for step in (10, 20):
            tracker.log_image(Image.new("RGB", (96, 32), (step, 0, 0)), key="centre_crop_256x256", step=step)
    client = MlflowClient(uri)
    logged = [a.path for a in client.list_artifacts(tracker.run_id, "images")]
    assert sum("centre_crop_256x256+step+10+" in p and p.endswith(".png") for p in logged) == 1
    assert sum("centre_crop_256x256+step+20+" in p and p.endswith(".png") for p in logged) == 1
