"""MLflow logging for every stage, training run and evaluation, that never kills the job.

An unreachable tracking server makes each call warn and retry a few times, then that call is skipped: a
two-week training run must not die because the MLflow host rebooted. Runs carry lineage tags (inputs,
output, config hash, git commit) so any output can be traced to what made it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from pipelines.common import verbose

log = logging.getLogger(__name__)

# Fail fast on a dead server instead of MLflow's default minutes of HTTP back-off per call.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# one line per download, not a redrawn bar per file (models:/ URIs in evaluate)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
if not verbose():  # the jobs print their runs' ids and the UI's address themselves
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

PARENT_RUN_ENV = "INFGEN_MLFLOW_PARENT_RUN_ID"
EXPERIMENT_KIND = "mlflow.experimentKind"
NEWEST_ALIAS = "newest"  # the registered model's alias for its latest trained version ("latest" is reserved)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1}; lists become JSON strings (MLflow params are strings)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return flat


def config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


GIT_COMMIT_ENV = "INFGEN_GIT_COMMIT"


def torch_version() -> str:
    """The installed torch's release, without a local build tag (2.14.1+cu130 → 2.14.1)."""
    import torch

    return torch.__version__.split("+")[0]


def git_commit() -> str:
    """The checkout's commit; else $INFGEN_GIT_COMMIT (a Ray job's working_dir upload leaves .git out, so the
    submitter passes `git rev-parse HEAD` in the runtime_env); else 'unknown'."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or os.environ.get(GIT_COMMIT_ENV) or "unknown"


def _digest(uri: str, fingerprint: Optional[str] = None) -> str:
    """A dataset's digest: its fingerprint (a stage output's directory is named by one), else a hash of the URI."""
    if fingerprint:
        return fingerprint
    last = uri.rstrip("/").rsplit("/", 1)[-1]
    if len(last) == 16 and all(c in "0123456789abcdef" for c in last):
        return last
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def lineage_datasets(tags: Mapping[str, str]) -> list:
    """MLflow dataset inputs for a stage's lineage tags: `infgen.input` (context training / evaluation / input by
    stage) and `infgen.output` (context output), digests from fingerprints (mlflow.log_input's model)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    stage = tags.get("infgen.stage", "")
    context = {"train": "training", "evaluate": "evaluation"}.get(stage, "input")
    found = []
    for key, ctx, fp in (("infgen.input", context, None), ("infgen.output", "output", tags.get("infgen.fingerprint"))):
        uri = tags.get(key)
        if uri and stage != "pipeline":
            name = f"{stage} {'input' if key == 'infgen.input' else 'output'}"
            dataset = Dataset(name=name, digest=_digest(str(uri), fp), source_type="path",
                              source=json.dumps({"uri": str(uri)}))
            found.append(DatasetInput(dataset, [InputTag("mlflow.data.context", ctx)]))
    return found


def logged_model_id(version: Any) -> Optional[str]:
    """The logged model (MLflow 3) behind a registered version: its `model_id`, which a version registered
    through a tracking server may leave empty, else the `models:/m-...` of its source."""
    if version is None:
        return None
    source = getattr(version, "source", "") or ""
    return getattr(version, "model_id", None) or (source[len("models:/"):] if source.startswith("models:/m-") else None)


def local_artifact_location(tracking_uri: str) -> Optional[str]:
    """Artifacts of a `sqlite:///path/mlflow.db` store go beside it (`path/mlartifacts`), not into ./mlruns of
    whatever directory the job ran in; None (MLflow's default) for servers."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


class Tracker:
    """One MLflow run. Use as a context manager; a failing call warns and the job goes on."""

    def __init__(self, tracking_uri: Optional[str], experiment: str, run_name: str,
                 tags: Optional[Mapping[str, str]] = None, parent_run_id: Optional[str] = None,
                 retries: int = 3, backoff_s: float = 1.0, run_id: Optional[str] = None,
                 reconnect_s: float = 60.0, system_metrics: bool = False) -> None:
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        self.experiment, self.run_name = experiment, run_name
        self.tags = dict(tags or {})
        self.parent_run_id = parent_run_id or os.environ.get(PARENT_RUN_ENV)
        self.retries, self.backoff_s, self.reconnect_s = retries, backoff_s, reconnect_s
        self._next_start = 0.0  # after a failed start, calls are skipped until then (a dead server is cheap)
        self.resume_run_id = run_id  # continue this run (a resumed training) instead of creating one
        self.run_id: Optional[str] = None
        self.client = None
        self.system_metrics = system_metrics  # CPU, memory, disk, network, GPU as system/* metrics while it runs
        self._monitor = None

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def __enter__(self) -> "Tracker":
        if self.run_id is None:
            self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # never left RUNNING: an interrupt is KILLED, any other exception FAILED
        self.end("FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def start(self) -> Optional[str]:
        from mlflow.tracking import MlflowClient

        def create() -> str:
            self.client = MlflowClient(self.tracking_uri)
            if self.resume_run_id:
                self.client.update_run(self.resume_run_id, status="RUNNING")
                return self.resume_run_id
            experiment = self.client.get_experiment_by_name(self.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                self.experiment, artifact_location=local_artifact_location(self.tracking_uri),
                # the UI then opens on the runs table (model training), not on GenAI traces
                tags={EXPERIMENT_KIND: "custom_model_development"})
            commit = git_commit()
            tags = {"mlflow.runName": self.run_name, "infgen.git_commit": commit, **self.tags}
            if commit != "unknown":
                tags["mlflow.source.git.commit"] = commit  # MLflow's own tag: the UI links the run to its source
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            run_id = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id
            datasets = lineage_datasets(self.tags)
            if datasets:  # the runs table's Dataset column: what the stage read and wrote
                self.client.log_inputs(run_id, datasets)
            return run_id

        self.run_id = self._try("start run", create)
        if self.run_id is None:
            self._next_start = time.monotonic() + self.reconnect_s
            log.warning("MLflow unreachable at %s: logging is skipped, retried in %.0f s", self.tracking_uri,
                        self.reconnect_s)
        else:
            log.info("MLflow run %s (%s) at %s", self.run_id, self.run_name, self.tracking_uri)
            if self.system_metrics:
                self._monitor = self._try("start system metrics", self._start_monitor)
        return self.run_id

    def _start_monitor(self):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.tracking_uri,
                                       resume_logging=bool(self.resume_run_id))
        monitor.start()
        return monitor

    def discard(self) -> None:
        """Delete this run (MLflow keeps it in the trash): a run that recorded nothing new."""
        if self.run_id:
            self._try("delete run", lambda: self.client.delete_run(self.run_id))
            self.run_id = None

    def end(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            self._try("stop system metrics", self._monitor.finish)
            self._monitor = None
        if self.run_id:
            self._try("end run", lambda: self.client.set_terminated(self.run_id, status))

    # ---- logging ------------------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self._call("log params", lambda chunk=items[i:i + 100]: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None,
                    model_id: Optional[str] = None) -> None:
        """Metrics at `step`; with `model_id` (a logged model's) they also show on that model's page."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0, model_id=model_id) for k, v in metrics.items() if v is not None]
        self._call("log metrics", lambda: self.client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._call("set tag", lambda k=k, v=v: self.client.set_tag(self.run_id, k, str(v)))

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._call("log artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_dict(self, obj: Any, name: str) -> None:
        self._call("log dict", lambda: self.client.log_dict(self.run_id, obj, name))

    def model_version(self, source: str, exported: Optional[Mapping[str, Any]] = None) -> Any:
        """The registered version (an MLflow ModelVersion) behind a model being scored: a models:/NAME/VERSION or
        models:/NAME@alias URI, or the record training wrote beside an exported directory (`exported`: its
        model_name and model_version); None when there is none."""
        def find() -> Any:
            if source.startswith("models:/"):
                ref = source[len("models:/"):].rstrip("/")
                if "@" in ref:
                    return self.client.get_model_version_by_alias(*ref.split("@", 1))
                return self.client.get_model_version(*ref.rsplit("/", 1))
            if exported and exported.get("model_name") and exported.get("model_version"):
                return self.client.get_model_version(exported["model_name"], str(exported["model_version"]))
            return None

        return self._call("find the model version", find)

    def log_image(self, image: Any, key: str, step: int) -> None:
        """A PIL image under `key` at `step`: the UI shows it with a step slider."""
        self._call("log image", lambda: self.client.log_image(self.run_id, image, key=key, step=step))

    def log_table(self, rows: list[dict], name: str) -> None:
        """Rows as an MLflow table artifact (`name`, .json): the UI's artifact view shows and compares it."""
        import pandas as pd

        self._call("log table", lambda: self.client.log_table(self.run_id, pd.DataFrame(rows), name))

    def set_note(self, text: str) -> None:
        """The run's description (`mlflow.note.content`): what a user reads first on the run's page."""
        self.set_tags({"mlflow.note.content": text})

    def log_figure(self, figure: Any, name: str) -> None:
        self._call("log figure", lambda: self.client.log_figure(self.run_id, figure, name))

    def log_infgen_model(self, model_dir: str | Path, registered_model_name: Optional[str] = None,
                         alias: str = NEWEST_ALIAS) -> Optional[str]:
        """Log an exported InfGen directory as this run's MLflow model `model` (pyfunc flavour: infgen/pyfunc.py
        with the infgen package as its code, a signature, the model config as metadata) and, with a name,
        register it and point `alias` at the new version. Returns the version (None: not registered)."""
        def log() -> Optional[str]:
            import mlflow

            import infgen
            from infgen import pyfunc
            from infgen.models import CONFIG_NAME

            # the model's config.json as saved: logged as it is, not rebuilt into an InfGenConfig (export wrote it)
            config = json.loads((Path(model_dir) / CONFIG_NAME).read_text())
            mlflow.set_tracking_uri(self.tracking_uri)
            # the fluent API logs models; attach it to this run (ending it there: the model comes last)
            with mlflow.start_run(run_id=self.run_id), warnings.catch_warnings():
                # its advice to give an input example: the signature below is explicit
                warnings.filterwarnings("ignore", message=".*An input example was not provided")
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=pyfunc.__file__, artifacts={pyfunc.ARTIFACT: str(model_dir)},
                    code_paths=[str(Path(infgen.__file__).parent)],
                    signature=pyfunc.signature(config["latent_channels"]),
                    # what loading needs (infgen's own imports), not an inference by importing the model
                    pip_requirements=[f"torch=={torch_version()}", "numpy", "safetensors", "pillow"],
                    metadata={"infgen_config": config, "scaling_factor": config["scaling_factor"]},
                    registered_model_name=registered_model_name)
            version = info.registered_model_version
            if registered_model_name and version is not None:
                self.client.set_registered_model_alias(registered_model_name, alias, str(version))
            return None if version is None else str(version)

        return self._call("log model", log)

    # ---- failure handling ---------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.run_id is None:  # never started (server down): try again, at most every reconnect_s
            if time.monotonic() < self._next_start or self.start() is None:
                return None
        return self._try(what, fn)

    def _try(self, what: str, fn: Callable[[], Any]) -> Any:
        for attempt in range(1, self.retries + 1):
            try:
                return fn()
            except Exception as e:  # network errors come in many types: never let logging kill the job
                log.warning("MLflow %s failed (attempt %d/%d, %s): %s", what, attempt, self.retries,
                            self.tracking_uri, e)
                if attempt < self.retries:
                    time.sleep(self.backoff_s * attempt)
        return None
