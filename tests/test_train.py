"""Training on Ray Train: 2 gloo workers, checkpoints, failure + restart, resume by rerunning, MLflow."""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from infgen.data import photo_pairs
from infgen.models import InfGen
from pipelines.checkpoint import STATE_FILE
from pipelines.common import resolve_files
from pipelines.config import dataclass_from
from pipelines.holdout import RECORD, Holdout, HoldoutRecord
from pipelines.shards import key_urls
from pipelines.sample_data import write_encoded_shards
from pipelines.train import TrainConfig, build_model, run_train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:LPIPS with a RANDOM")


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tiny_vae, photos):
    """Shards in the encode stage's layout from real photos: 4 crops of each."""
    latents, hr = photo_pairs(list(photos.values()), tiny_vae, crops_per_image=4, input_size=128, hr_size=256)
    return write_encoded_shards(tmp_path_factory.mktemp("encoded"), latents, hr)


def config(encoded, output, tracking_uri, **train):
    cfg = OmegaConf.load(ROOT / "conf/train/local.yaml")
    cfg.data, cfg.output, cfg.mlflow.tracking_uri = str(encoded), str(output), tracking_uri
    cfg.mlflow.registered_model_name = "infgen-test"
    cfg.train.update({"steps": 24, "checkpoint_every": 8, "log_every": 4, "sample_every": 10, "sizes": [64, 128],
                      **train})
    return cfg


def failing_once_at(step: int, train_loop):
    """`train_loop` whose last rank raises right after training step `step`, once: the marker `.failed_at_<step>`
    in the run directory lets the restarted attempt go on. Defined in a function: cloudpickle sends it to the
    workers by value, and it patches InfGenTrainer there, in each worker's own process."""
    def loop_failing_once(cfg: dict) -> None:
        import ray.train
        from infgen.training import InfGenTrainer

        ctx = ray.train.get_context()
        last_rank = ctx.get_world_rank() == ctx.get_world_size() - 1
        marker = Path(cfg["run_dir"]) / f".failed_at_{step}"
        train_step = InfGenTrainer.train_step

        def train_step_failing_once(self, *args, **kwargs):
            log = train_step(self, *args, **kwargs)
            if self.step == step and last_rank and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
                raise RuntimeError(f"injected failure at step {step}")
            return log

        InfGenTrainer.train_step = train_step_failing_once
        try:
            train_loop(cfg)
        finally:
            InfGenTrainer.train_step = train_step

    return loop_failing_once


def test_two_workers_fail_restart_and_log_to_mlflow(ray_local, encoded, tmp_path, mlflow_server, tiny_vae,
                                                    monkeypatch):
    import pipelines.train

    cfg = config(encoded, tmp_path / "train", mlflow_server)
    # run_train looks train_loop up at call time: the TorchTrainer gets the failing one
    monkeypatch.setattr(pipelines.train, "train_loop", failing_once_at(11, pipelines.train.train_loop))
    result = run_train(cfg)

    # the injected failure happened, and the run restarted from the step-8 checkpoint to finish at 24
    assert (tmp_path / "train" / cfg.name / ".failed_at_11").exists()
    state = torch.load(Path(result.checkpoint) / STATE_FILE, weights_only=False)["trainer"]
    assert state["step"] == 24
    adam_steps = {int(s["step"]) for s in state["opt_g"]["state"].values()}
    assert adam_steps == {24}  # no step lost or repeated: the optimizer state is that of 24 steps
    assert sorted(p.name for p in Path(result.checkpoint).iterdir()) == ["rng_rank0.pt", "rng_rank1.pt", STATE_FILE]

    model = InfGen.from_pretrained(result.model_dir)
    assert model.decode(torch.randn(1, 4, 16, 16), (96, 160)).shape == (1, 3, 96, 160)
    assert model.config.scaling_factor == tiny_vae.scaling_factor  # the latent space it was trained in
    # the split it was trained with, kept with the model and beside its checkpoints (the evaluation reads it)
    record = HoldoutRecord.read(Path(result.model_dir) / RECORD)
    fs, paths = resolve_files(str(encoded))
    assert record.holdout == Holdout(fraction=0.1) and record.data == str(encoded)  # conf/train/local.yaml's split
    assert record.held_out_rows == len(Holdout(fraction=0.1).keys_in(key_urls(fs, paths))) > 0
    assert record.rows == sum(len(keys) for keys, _ in key_urls(fs, paths)) and len(record.sample_keys) == 2
    assert HoldoutRecord.read(tmp_path / "train" / cfg.name / RECORD) == record
    # the documented next command, conf/eval/local.yaml on the same data, scores exactly the rows held out
    from jobs.config import load_job_config
    from pipelines.config import dataclass_from
    from pipelines.evaluate import EvalConfig, plan

    evaluation = dataclass_from(EvalConfig, load_job_config(ROOT / "conf/eval/local.yaml", [
        f"model={result.model_dir}", f"data={encoded}"]))
    scored = {k for unit in plan(evaluation).units for k in unit["keys"]}
    assert scored == set(Holdout(fraction=0.1).keys_in(key_urls(fs, paths)))

    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(result.run_id, "loss")
    steps = sorted({m.step for m in history})
    assert steps == [4, 8, 10, 12, 16, 20, 24]  # every log_every, sample_every, and the end
    first, last = [np.mean([m.value for m in history if m.step == s]) for s in (4, 24)]
    assert last < first
    run = client.get_run(result.run_id)
    assert {"samples_per_s", "lr", "grad_norm", "sample_psnr_128x128", "baseline_psnr_128x128"} <= set(run.data.metrics)
    assert run.data.params["train.num_workers"] == "2" and run.data.tags["infgen.stage"] == "train"
    assert run.data.params["holdout.data_fingerprint"] == record.data_fingerprint
    assert RECORD in {a.path for a in client.list_artifacts(result.run_id)}
    samples = [a.path for a in client.list_artifacts(result.run_id, "samples")]
    assert {"samples/samples_step0000010.png", "samples/samples_step0000020.png",
            "samples/samples_step0000024.png"} <= set(samples)  # sample_every need not be a multiple of log_every
    crops = [a.path for a in client.list_artifacts(result.run_id, "images")]  # full resolution, step-indexed
    assert {s for s in (10, 20, 24) if any(f"centre_crop_256x256+step+{s}+" in p for p in crops)} == {10, 20, 24}
    assert set(run.data.metrics).isdisjoint({"lpips"})  # the random-backbone term is not called LPIPS
    note = run.data.tags["mlflow.note.content"]  # the run's description: result and caveats
    assert note.startswith("InfGen tiny trained 24 steps") and "RANDOM backbone" in note and "256x256: " in note
    # logged as an MLflow model (pyfunc), registered from this run, the alias on it; it decodes as the export does
    assert [v.run_id for v in client.search_model_versions("name='infgen-test'")] == [result.run_id]
    assert client.get_model_version_by_alias("infgen-test", "newest").run_id == result.run_id
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    pyfunc = mlflow.pyfunc.load_model("models:/infgen-test@newest")
    assert pyfunc.metadata.metadata["scaling_factor"] == tiny_vae.scaling_factor
    latents = torch.randn(1, 4, 16, 16)
    images = pyfunc.predict(latents.numpy(), params={"height": 96, "width": 160})
    expected = ((model.decode(latents, (96, 160)) + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1)
    assert images.shape == (1, 96, 160, 3) and images.dtype == np.uint8
    assert np.abs(images.astype(int) - expected.numpy().astype(int)).max() <= 1


def test_killed_run_resumes_when_rerun(ray_local, encoded, tmp_path):
    # on 64-px windows of the 64..128-px outputs: the resumed run must draw the same windows
    cfg = config(encoded, tmp_path / "train", f"sqlite:///{tmp_path}/mlflow.db", steps=24, window=64)
    OmegaConf.save(cfg, tmp_path / "train.yaml")
    command = [sys.executable, "-m", "jobs.train", "--config", str(tmp_path / "train.yaml")]
    env = {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    run_dir = tmp_path / "train" / cfg.name
    deadline = time.time() + 300
    while time.time() < deadline and not list(run_dir.glob(f"checkpoint_*/{STATE_FILE}")):
        time.sleep(0.5)
    process.kill()  # the driver dies mid-run (its workers go with it)
    process.wait()
    assert list(run_dir.glob(f"checkpoint_*/{STATE_FILE}")), process.stdout.read().decode()[-3000:]

    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[train] resumed from step" in done.stdout + done.stderr
    last = max((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    assert torch.load(last / STATE_FILE, weights_only=False)["trainer"]["step"] == 24


def test_training_windows_are_seeded_per_step_and_inside_the_output():
    from pipelines.train import TrainLoopConfig

    train = TrainLoopConfig(sizes=[192, 192], multiple=8, aspect_range=[1.5, 1.5], window=64, seed=3)  # 128×192
    assert train.geometry(5, 8) == train.geometry(5, 8)
    geometries = {train.geometry(step, 8) for step in range(50)}
    assert {size for size, _ in geometries} == {(128, 192)}
    windows = {window for _, window in geometries}
    assert len(windows) > 10
    for top, left, height, width in windows:
        assert (height, width) == (64, 64) and top % 8 == left % 8 == 0
        assert top + height <= 128 and left + width <= 192
    assert TrainLoopConfig(window=None, seed=0).geometry(1, 8)[1] is None
    small = TrainLoopConfig(sizes=[64, 64], multiple=8, aspect_range=[1.0, 1.0], window=64, seed=3)
    assert small.geometry(1, 8) == ((64, 64), None)  # the window covers the output: train on all of it
    sizes = {TrainLoopConfig(sizes=[128, 256], seed=0).geometry(step, 8)[0] for step in range(50)}
    assert len(sizes) > 3 and all(128 <= max(s) <= 256 and s[0] % 16 == s[1] % 16 == 0 for s in sizes)


def test_a_step_draws_its_views_independently_and_view_0_as_a_single_view_step():
    from pipelines.train import TrainLoopConfig

    train = TrainLoopConfig(sizes=[256, 1024], window=64, views=4, batch_size=8, seed=3)
    assert all(train.geometry(step, 8, 0) == replace(train, views=1).geometry(step, 8)
               for step in range(20))
    views = [train.geometry(5, 8, view) for view in range(4)]
    assert len(set(views)) == 4 and all(window[2:] == (64, 64) for _, window in views)
    with pytest.raises(ValueError, match="divisible"):
        TrainLoopConfig(batch_size=6, num_workers=2, views=2, window=64)
    with pytest.raises(ValueError, match="window"):  # views are concatenated: each must be a whole 64² window
        TrainLoopConfig(sizes=[64, 128], views=2, window=64, batch_size=4)


def test_window_targets_are_the_window_of_the_full_target():
    import io

    from infgen.images import shipped_photos
    from pipelines.train import decode_targets

    buffer = io.BytesIO()
    shipped_photos(["coffee"])["coffee"].resize((600, 400)).save(buffer, format="PNG")
    hr = [buffer.getvalue()] * 2
    full = decode_targets(hr, (256, 384))
    window = decode_targets(hr, (256, 384), (64, 128, 64, 64))
    assert full.shape == (2, 3, 256, 384) and window.shape == (2, 3, 64, 64)
    # Pillow filters the window from the pixels around its box too: equal to the full resize's window
    # up to rounding to 8 bits
    assert (window - full[..., 64:128, 128:192]).abs().max() < 2.5 / 255
    # views: each crop decoded once, windows of several sizes, view-major
    views = [((256, 384), (64, 128, 64, 64)), ((128, 192), (0, 0, 64, 64))]
    both = decode_targets(hr, None, views=views)
    assert torch.equal(both[:2], window) and torch.equal(both[2:], decode_targets(hr, (128, 192), (0, 0, 64, 64)))

    # a JPEG crop decodes at a reduced scale (draft mode) that still covers the output: close to the full decode
    buffer = io.BytesIO()
    shipped_photos(["coffee"])["coffee"].resize((1200, 800)).save(buffer, format="JPEG", quality=95)
    jpeg = [buffer.getvalue()]
    reduced = decode_targets(jpeg, (256, 384), (64, 128, 64, 64))
    from PIL import Image

    exact = Image.open(io.BytesIO(jpeg[0])).convert("RGB").resize((384, 256), Image.BICUBIC)
    exact = torch.from_numpy(np.asarray(exact)).permute(2, 0, 1)[:, 64:128, 128:192] / 127.5 - 1
    assert reduced.shape == (1, 3, 64, 64) and (reduced[0] - exact).abs().mean() < 4 / 255


def test_stage2_starts_from_stage1(tmp_path):
    stage1 = InfGen.from_preset("tiny")
    stage1.save_pretrained(tmp_path / "exported")
    model = build_model("tiny", {"grad_checkpointing": True}, str(tmp_path / "exported"))
    assert model.config.grad_checkpointing
    for a, b in zip(stage1.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    (tmp_path / "ckpt").mkdir()
    torch.save({"trainer": {"ema": stage1.state_dict()}}, tmp_path / "ckpt" / STATE_FILE)
    model = build_model("tiny", {"grad_checkpointing": True}, str(tmp_path / "ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(stage1.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="neither a training checkpoint"):
        build_model("tiny", {"grad_checkpointing": True}, str(tmp_path))
    # an exported model's config changes through InfGenConfig's checks, as a preset's does
    with pytest.raises(ValueError, match="upsampler_norm"):
        build_model("tiny", {"upsampler_norm": "batch"}, str(tmp_path / "exported"))


def test_unreachable_tracking_server_does_not_stop_training(ray_local, encoded, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = config(encoded, tmp_path / "train", dead, steps=8, checkpoint_every=4, log_every=4, sample_every=4)
    result = run_train(cfg)  # warns, keeps training
    assert result.run_id is None
    assert torch.load(Path(result.checkpoint) / STATE_FILE, weights_only=False)["trainer"]["step"] == 8
    assert InfGen.from_pretrained(result.model_dir).config.width == 64


def test_unknown_training_keys_fail_before_any_worker_starts(tmp_path):
    cfg = config(tmp_path, tmp_path / "train", None)
    cfg.train.stpes = 3
    cfg.optim.learning_rate = 1.0
    with pytest.raises(ValueError, match=r"training config: unknown keys \['optim.learning_rate', 'train.stpes'\]"):
        run_train(cfg)
    del cfg.train.stpes
    with pytest.raises(ValueError, match=r"training config: unknown keys \['optim.learning_rate'\]"):
        run_train(cfg)
    del cfg.optim.learning_rate
    cfg.holdout.fraction = 1.5
    with pytest.raises(ValueError, match=r"holdout.fraction must be a number in \[0, 1\), got 1.5"):
        run_train(cfg)


@pytest.mark.parametrize("override, message", [
    ("train.sizes=[256,abc]", r"train.sizes\[1\]='abc': Value 'abc' of type 'str' could not be converted to Integer"),
    ("train.sizes=[]", r"train.sizes=\[\] must be two numbers \[smallest, largest\]"),
    ("train.sizes=[512,256]", r"train.sizes=\[512, 256\] must be two numbers"),
    ("train.sizes=256", r"train.sizes=256: a list is needed, e.g. train.sizes=\[256\]"),
    ("train.sizes=[8,64]", r"train.sizes=\[8, 64\] starts below train.multiple=16"),
    ("train.num_workers=0", r"train.num_workers=0 must be positive"),
    ("train.batch_size=0", r"train.batch_size=0 must be positive"),
    ("train.window=0", r"train.window=0 must be positive"),
    ("train.aspect_range=[2.0,0.5]", r"train.aspect_range=\[2.0, 0.5\] must be two numbers"),
    ("output=s3://bucket/train", r"output='s3://bucket/train' is a URI; checkpoints and the exported model need a "
                                 r"POSIX path"),
    ("init_from=gs://bucket/model", r"init_from='gs://bucket/model' is a URI"),
])
def test_values_a_run_would_crash_on_are_named_on_the_driver(tmp_path, override, message):
    """Each would otherwise pass --dry-run and fail later: a traceback on the workers (sizes, counts), or a model
    written to a local directory named `s3:` (an object-store output)."""
    from jobs.config import load_job_config

    cfg = load_job_config(ROOT / "conf/train/local.yaml", [f"data={tmp_path}", override])
    with pytest.raises(ValueError, match="training config: " + message):
        dataclass_from(TrainConfig, cfg)


def test_the_schedule_spans_the_run_and_another_total_steps_is_refused(tmp_path):
    cfg = config(tmp_path, tmp_path / "train", None)  # train.steps: 24, optim.total_steps left out
    assert dataclass_from(TrainConfig, cfg).optim.total_steps == 24
    cfg.optim.total_steps = 24
    assert dataclass_from(TrainConfig, cfg).optim.total_steps == 24
    cfg.optim.total_steps = 1000  # never silently replaced
    with pytest.raises(ValueError, match=r"optim.total_steps=1000 differs from train.steps=24"):
        dataclass_from(TrainConfig, cfg)


def test_a_rerun_with_another_model_config_is_refused_before_any_worker_starts(tmp_path):
    from pipelines.checkpoint import RUN_CONFIG
    from pipelines.train import check_resume

    cfg = dataclass_from(TrainConfig, {"preset": "tiny", "model": {"scaling_factor": 0.18215}, "data": "d",
                                       "output": str(tmp_path), "vae": "tiny"})
    check_resume(str(tmp_path / "run"), cfg)  # the first run records what it trains with
    check_resume(str(tmp_path / "run"), cfg)  # the same again: resumes
    record = tmp_path / "run" / RUN_CONFIG  # a record from before the loss was a checked section: only set keys
    record.write_text(json.dumps({**json.loads(record.read_text()), "loss": {"l1_weight": cfg.loss.l1_weight}}))
    check_resume(str(tmp_path / "run"), cfg)  # resumes too: the record's loss is read over LossConfig's defaults
    changed = replace(cfg, model={"scaling_factor": 0.18215, "width": 32})
    with pytest.raises(ValueError, match=r"run holds checkpoints trained with another config \(model.width: None → 32\)"
                                         r".*init_from="):
        check_resume(str(tmp_path / "run"), changed)
