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
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

log = logging.getLogger(__name__)

# Fail fast on a dead server instead of MLflow's default minutes of HTTP back-off per call.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

PARENT_RUN_ENV = "INFGEN_MLFLOW_PARENT_RUN_ID"


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


def git_commit() -> str:
    """The checkout's commit; else $INFGEN_GIT_COMMIT (a Ray job's working_dir upload leaves .git out, so the
    submitter passes `git rev-parse HEAD` in the runtime_env); else 'unknown'."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or os.environ.get(GIT_COMMIT_ENV) or "unknown"


class Tracker:
    """One MLflow run. Use as a context manager; a failing call warns and the job goes on."""

    def __init__(self, tracking_uri: Optional[str], experiment: str, run_name: str,
                 tags: Optional[Mapping[str, str]] = None, parent_run_id: Optional[str] = None,
                 retries: int = 3, backoff_s: float = 1.0, run_id: Optional[str] = None,
                 reconnect_s: float = 60.0) -> None:
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        self.experiment, self.run_name = experiment, run_name
        self.tags = dict(tags or {})
        self.parent_run_id = parent_run_id or os.environ.get(PARENT_RUN_ENV)
        self.retries, self.backoff_s, self.reconnect_s = retries, backoff_s, reconnect_s
        self._next_start = 0.0  # after a failed start, calls are skipped until then (a dead server is cheap)
        self.resume_run_id = run_id  # continue this run (a resumed training) instead of creating one
        self.run_id: Optional[str] = None
        self.client = None

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def __enter__(self) -> "Tracker":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type else "FINISHED")

    def start(self) -> Optional[str]:
        from mlflow.tracking import MlflowClient

        def create() -> str:
            self.client = MlflowClient(self.tracking_uri)
            if self.resume_run_id:
                self.client.update_run(self.resume_run_id, status="RUNNING")
                return self.resume_run_id
            experiment = self.client.get_experiment_by_name(self.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.experiment)
            tags = {"mlflow.runName": self.run_name, "infgen.git_commit": git_commit(), **self.tags}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            return self.client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id

        self.run_id = self._try("start run", create)
        if self.run_id is None:
            self._next_start = time.monotonic() + self.reconnect_s
            log.warning("MLflow unreachable at %s: logging is skipped, retried in %.0f s", self.tracking_uri,
                        self.reconnect_s)
        else:
            log.info("MLflow run %s (%s) at %s", self.run_id, self.run_name, self.tracking_uri)
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self._try("end run", lambda: self.client.set_terminated(self.run_id, status))

    # ---- logging ------------------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self._call("log params", lambda chunk=items[i:i + 100]: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        self._call("log metrics", lambda: self.client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._call("set tag", lambda k=k, v=v: self.client.set_tag(self.run_id, k, str(v)))

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._call("log artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_dict(self, obj: Any, name: str) -> None:
        self._call("log dict", lambda: self.client.log_dict(self.run_id, obj, name))

    def log_figure(self, figure: Any, name: str) -> None:
        self._call("log figure", lambda: self.client.log_figure(self.run_id, figure, name))

    def register_model(self, name: str, artifact_path: str) -> Optional[str]:
        """Register the run's artifact directory `artifact_path` as a new version of model `name`."""
        def register() -> str:
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(name)
            except MlflowException:
                pass  # it exists already: add a version
            source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
            return self.client.create_model_version(name, source, run_id=self.run_id).version

        return self._call("register model", register)

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
