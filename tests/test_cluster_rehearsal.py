"""A rehearsal of the cluster workflow (README.md, "Running on a Ray cluster") on this machine: a two-node Ray cluster started with
`ray start` as separate processes, a real MLflow server, and stages submitted through the Ray Jobs API with a
working_dir upload, exactly as `ray job submit` does it:

  (a) the filter stage with the cluster config (conf/cluster/filter.yaml, paths overridden, MLflow from the
      runtime_env's MLFLOW_TRACKING_URI), on LAION-style parquet;
  (b) a short training (conf/train/local.yaml) whose two Ray Train workers land on the two nodes (DDP across
      raylets), on shards in the encode stage's layout.

Then MLflow must hold both runs with their metrics and lineage tags, and the model must be exported.

Only the processes this test starts are stopped: each `ray start --block` runs in its own session, and
everything carrying this cluster's token in its environment (raylet workers, the job drivers, which Ray puts in
sessions of their own) is killed at the end. `ray stop` is never used: it would kill every Ray on the machine,
including the test session's own (the `ray_local` fixture).

    pytest tests/test_cluster_rehearsal.py      # 1.5–2 min on 2 cores
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import numpy as np
import pytest

from pipelines.checkpoint import STATE_FILE
from pipelines.sample_data import write_encoded_shards, write_laion_parquet
from pipelines.services import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's: `ray`, and the Python every node and job runs
TOKEN_VAR = "INFGEN_REHEARSAL_CLUSTER"  # in the environment of every process of the cluster this test starts
EXCLUDES = [".git", ".venv", "outputs", "mlruns", "mlflow.db", "*.egg-info", ".pytest_cache", "__pycache__"]
NODE_CPUS = 3  # logical (this machine has 2 cores): two training workers of 2 CPUs cannot share a node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.filterwarnings("ignore:LPIPS with a RANDOM")]


# ---- the cluster ------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int]:
    """(state, session id) of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[3])  # state, ppid, pgrp, session


def _has_token(pid: int, token: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{TOKEN_VAR}={token}".encode() in f.read().split(b"\0")
    except OSError:
        return False


class LocalCluster:
    """A head node and a worker node, each a `ray start --block` in its own session, on 127.0.0.1."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self.root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's unix socket paths
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
        self.env.update({TOKEN_VAR: self.token, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"})

    def _start(self, name: str, args: list[str]) -> None:
        # every node on one machine needs its own ports (the agent's default 52365 would clash) and temp dir;
        # the temp dir also keeps this cluster out of /tmp/ray, where `ray.init()` looks for one to join
        args = [str(BIN / "ray"), "start", "--block", f"--num-cpus={NODE_CPUS}", "--disable-usage-stats",
                f"--temp-dir={self.root / name}", f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}", *args]
        log = open(self.root / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def start(self) -> None:
        self._start("head", ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"])
        self._wait(lambda: urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2), "the head's dashboard")
        self._start("worker", [f"--address=127.0.0.1:{self.gcs_port}"])
        self._wait(lambda: len(self.alive_nodes()) == 2 or None, "two alive nodes")

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)

    def _wait(self, probe, what: str, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"`{' '.join(p.args[:3])}` exited with {p.returncode}: {self.logs()}")
            try:
                if probe():
                    return
            except Exception:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))

    def processes(self) -> list[int]:
        """Live processes of this cluster: in the sessions of its `ray start`s, or carrying its token."""
        sessions = {p.pid for p in self.procs}
        mine = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                state, sid = _proc_stat(int(entry))
            except (OSError, IndexError):
                continue
            if state != "Z" and (sid in sessions or _has_token(int(entry), self.token)):
                mine.append(int(entry))
        return mine

    def stop(self) -> list[int]:
        """Kill this cluster's processes (and nothing else); return any still alive afterwards."""
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while time.time() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.2)
        deadline = time.time() + 15
        while (left := self.processes()) and time.time() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.3)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return self.processes()


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        left = c.stop()
        assert not left, f"processes of the rehearsal cluster still alive: {left}"
        shutil.rmtree(c.root, ignore_errors=True)


# ---- jobs -------------------------------------------------------------------------------------------------


def submit_and_wait(client, args: list[str], env: dict, timeout: float = 300) -> str:
    """Submit `python args...` (the venv's Python: nodes run it, not whatever `python` is on PATH) with the
    repository as working_dir; wait for SUCCEEDED, else fail with the job's logs. Returns the logs."""
    from ray.job_submission import JobStatus

    job = client.submit_job(entrypoint=shlex.join([sys.executable, *args]),
                            submission_id=f"rehearsal-{args[1].split('.')[-1]}-{uuid.uuid4().hex[:6]}",
                            runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env})
    deadline = time.time() + timeout
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            client.stop_job(job)
            pytest.fail(f"job {job} still {status} after {timeout} s:\n{client.get_job_logs(job)[-6000:]}")
        time.sleep(1)
    logs = client.get_job_logs(job)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job)
        pytest.fail(f"job {job} {status} ({info.message}):\n{logs[-6000:]}")
    return logs


def git_head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def jobs(cluster, mlflow_server, tiny_vae):
    from ray.job_submission import JobSubmissionClient

    from infgen.vae import cache_dir

    client = JobSubmissionClient(cluster.dashboard)
    env = {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
           "INFGEN_CACHE": str(cache_dir()),  # the tiny VAE, fitted by the `tiny_vae` fixture
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "MLFLOW_TRACKING_URI": mlflow_server,
           "INFGEN_GIT_COMMIT": git_head(), "OMP_NUM_THREADS": "1"}
    return client, env


def laion_rows() -> tuple[list[dict], dict]:
    """Rows in the Aesthetics V2 schema: 4 that pass conf/cluster/filter.yaml, then one per drop reason."""
    good = [{"url": f"https://images.example.com/{i}.jpg", "text": f"photo {i}", "width": 2048, "height": 1536,
             "aesthetic": 6.0} for i in range(4)]
    bad = {"too_small": {"width": 1200, "height": 900}, "short_side": {"width": 4000, "height": 800},
           "aspect_ratio": {"width": 3200, "height": 1200}, "low_aesthetic": {"aesthetic": 4.0},
           "unsafe": {"punsafe": 0.9}, "watermark": {"pwatermark": 0.8},
           "bad_url": {"url": "ftp://images.example.com/x.jpg"}, "private_host": {"url": "http://10.0.0.7/x.jpg"},
           "duplicate_url": {"url": good[0]["url"]}}
    rows = good + [{**good[1], "url": f"https://images.example.com/{reason}.jpg", **change}
                   for reason, change in bad.items()]
    return rows, {reason: 1 for reason in bad}


def encoded_shards(directory: Path, vae, photos) -> Path:
    """Two parquet shards in the encode stage's layout (key, fp16 latent tensor column, PNG crop)."""
    from infgen.data import photo_pairs

    latents, hr = photo_pairs(list(photos.values()), vae, crops_per_image=2, input_size=128, hr_size=256, seed=0)
    return write_encoded_shards(directory, latents, hr)


# ---- the rehearsal ----------------------------------------------------------------------------------------


def test_two_nodes_are_alive(cluster):
    nodes = cluster.alive_nodes()
    assert len(nodes) == 2 and sum(n.is_head_node for n in nodes) == 1
    assert all(n.resources_total.get("CPU") == NODE_CPUS for n in nodes)


def test_filter_job(cluster, jobs, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    client, env = jobs
    rows, dropped = laion_rows()
    write_laion_parquet(tmp_path / "laion" / "part-00000.parquet", rows[:7], "aesthetics_v2")
    write_laion_parquet(tmp_path / "laion" / "part-00001.parquet", rows[7:], "aesthetics_v2")
    # the cluster config as a user submits it: only paths and the experiment overridden; the tracking URI
    # comes from the runtime_env's MLFLOW_TRACKING_URI through the config's ${oc.env:...} default
    logs = submit_and_wait(client, ["-m", "jobs.filter", "--config", "conf/cluster/filter.yaml",
                                    f"input={tmp_path / 'laion'}", f"output={tmp_path / 'filter'}",
                                    "mlflow.experiment=rehearsal-data"], env)
    outputs = [p for p in (tmp_path / "filter").iterdir() if (p / "_SUCCESS").exists()]
    assert len(outputs) == 1, logs[-3000:]
    assert pq.read_table(outputs[0]).num_rows == 4

    mlflow = MlflowClient(mlflow_server)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("rehearsal-data").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "filter" and run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert (metrics["rows_in"], metrics["rows_out"]) == (len(rows), 4)
    assert {k[len("dropped_"):]: v for k, v in metrics.items() if k.startswith("dropped_") and v} == dropped
    tags = run.data.tags
    assert tags["infgen.stage"] == "filter"
    assert tags["infgen.input"] == str(tmp_path / "laion") and tags["infgen.output"] == str(outputs[0])
    assert tags["infgen.fingerprint"] == outputs[0].name and len(tags["infgen.config_hash"]) == 16
    assert tags["infgen.git_commit"] == git_head()  # .git is not uploaded: it comes from INFGEN_GIT_COMMIT
    assert run.data.params["min_pixels"] == "2000000"  # the cluster config's thresholds


def test_train_job_on_two_nodes(cluster, jobs, mlflow_server, tmp_path, tiny_vae, photos):
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors

    from infgen.models import InfGen

    client, env = jobs
    data = encoded_shards(tmp_path / "encoded", tiny_vae, photos)
    # Ray Train packs workers onto as few nodes as fit: two workers of 2 CPUs on nodes of 3 CPUs land one per
    # node, and each node keeps 1 CPU for Ray Data's read tasks
    logs = submit_and_wait(client, [
        "-m", "jobs.train", "--config", "conf/train/local.yaml", f"data={data}", f"output={tmp_path / 'train'}",
        "name=rehearsal", "train.steps=6", "train.checkpoint_every=3", "train.log_every=3", "train.sample_every=6",
        "train.sizes=[64,128]", "train.num_workers=2", "train.cpus_per_worker=2", "samples.sizes=[[64,64],[96,160]]",
        "mlflow.experiment=rehearsal-train", "mlflow.registered_model_name=infgen-rehearsal"], env)
    assert "[train] step 6/6" in logs, logs[-3000:]

    workers = list_actors(address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")],
                          detail=True, raise_on_missing_output=False)
    assert len(workers) == 2 and len({w.node_id for w in workers}) == 2, workers  # DDP across two raylets

    run_dir = tmp_path / "train" / "rehearsal"
    model = InfGen.from_pretrained(run_dir / "model")
    assert model.config.scaling_factor == tiny_vae.scaling_factor
    assert len(list(run_dir.glob(f"checkpoint_*/{STATE_FILE}"))) == 2  # steps 3 and 6 (keep_checkpoints: 2)

    mlflow = MlflowClient(mlflow_server)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("rehearsal-train").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "rehearsal" and run.info.status == "FINISHED"
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "loss")] == [3, 6]
    assert {"l1", "lr", "samples_per_s", "sample_psnr_64x64", "baseline_psnr_160x96"} <= set(run.data.metrics)
    tags = run.data.tags
    assert tags["infgen.stage"] == "train" and tags["infgen.input"] == str(data)
    assert tags["infgen.output"] == str(run_dir) and len(tags["infgen.config_hash"]) == 16
    assert tags["infgen.git_commit"] == git_head()
    assert run.data.params["train.num_workers"] == "2"
    # the MLflow model, registered from this run, loads and decodes with nothing but MLflow
    assert [v.run_id for v in mlflow.search_model_versions("name='infgen-rehearsal'")] == [run.info.run_id]
    import mlflow as fluent

    fluent.set_tracking_uri(mlflow_server)
    model = fluent.pyfunc.load_model("models:/infgen-rehearsal@newest")
    assert model.predict(np.zeros((1, 4, 16, 16), np.float32), params={"height": 96, "width": 64}).shape == (1, 96, 64, 3)


def test_encode_job_writes_shards_on_both_nodes(cluster, jobs, tmp_path):
    import json

    import webdataset as wds

    from pipelines.sample_data import LARGE_PHOTOS, write_photos

    client, env = jobs
    write_photos(tmp_path / "photos")
    (tmp_path / "shards").mkdir()
    names = list(LARGE_PHOTOS)
    for s in range(4):  # 4 shards of 2 photos
        with wds.TarWriter(str(tmp_path / "shards" / f"{s:05d}.tar")) as tar:
            for i, name in enumerate(names[2 * s:2 * s + 2]):
                tar.write({"__key__": f"{s:05d}{i:04d}", "jpg": (tmp_path / "photos" / f"{name}.jpg").read_bytes()})
    # actors of 2 CPUs on nodes of 3: one actor per node, each writing the shards it encodes. Ray Data starts an
    # actor pool's actors asynchronously by default, so on a busy machine one actor could take every shard before
    # the other is up: wait for both (Ray Data's own setting), so the test does not depend on timing
    env = {**env, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120"}
    logs = submit_and_wait(client, [
        "-m", "jobs.encode", "--config", "conf/data/encode.yaml", f"input={tmp_path / 'shards'}",
        f"output={tmp_path / 'encoded'}", "input_size=128", "min_side=256", "hr_max_side=512", "num_actors=2",
        "cpus_per_actor=2", "max_image_pixels=20000000", "batch_size=2", "mlflow.enabled=false"], env)
    outputs = [p for p in (tmp_path / "encoded").iterdir() if (p / "_SUCCESS").exists()]
    assert len(outputs) == 1, logs[-3000:]
    stats = json.loads((outputs[0] / "_stats.json").read_text())
    assert (stats["images_in"], stats["encoded"], stats["shards"]) == (8, 8, 4)
    assert stats["last_run"]["writer_nodes"] == 2, stats
    assert sorted(p.name for p in outputs[0].glob("*.parquet")) == [f"{s:05d}.parquet" for s in range(4)]
