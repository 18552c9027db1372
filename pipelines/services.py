"""Local services the demo and the tests start and stop themselves, bound to 127.0.0.1: an MLflow tracking server
(SQLite backend, artifacts on disk) and an S3-API server (moto) for the object-store tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server_command(root: Path, port: int) -> list[str]:
    """The command that serves the tracking data under `root` (mlflow.db, artifacts/) on 127.0.0.1:port."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", str(root / "artifacts"), "--workers", "1",
            "--host", "127.0.0.1", "--port", str(port)]


def _wait_until_up(proc: subprocess.Popen, url: str, log: Path, what: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{what} did not start (see {log}): {log.read_text()[-2000:]}") from None
            time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def s3_server(root: Path, port: int, timeout_s: float = 60) -> Iterator[str]:
    """Start moto's S3-API server on 127.0.0.1:port (state in memory; its log under `root`), yield its endpoint URL;
    stop it on exit. Clients find it through AWS_ENDPOINT_URL, which pyarrow, boto3 and s3fs all read."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with open(root / "s3.log", "w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(proc, f"{endpoint}/moto-api/", root / "s3.log", "the S3 server (moto)", timeout_s)
        yield endpoint
    finally:
        _stop(proc)


@contextlib.contextmanager
def mlflow_server(root: Path, port: Optional[int] = None, timeout_s: float = 120) -> Iterator[str]:
    """Start an MLflow server over `root`, wait for /health, yield its URI; stop it on exit."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner workers: ~0.5 GB less
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(mlflow_server_command(root, port), env=env, stdout=subprocess.DEVNULL, stderr=log)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(proc, f"{uri}/health", root / "server.log", "mlflow server", timeout_s)
        yield uri
    finally:
        _stop(proc)
