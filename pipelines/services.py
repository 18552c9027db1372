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


@contextlib.contextmanager
def _serve(command: list[str], port: int, health: str, log: Path, what: str, timeout_s: float,
           env: Optional[dict] = None) -> Iterator[str]:
    """Run a server `command` on 127.0.0.1:port (stderr to `log`), wait until GET `health` answers 200, yield its
    base URL; stop it on exit. Raises RuntimeError with the log's tail when it exits or times out first."""
    with open(log, "w") as stream:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stream)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                if urllib.request.urlopen(f"{url}{health}", timeout=2).status == 200:
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{what} did not start (see {log}): {log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
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
    with _serve(command, port, "/moto-api/", root / "s3.log", "the S3 server (moto)", timeout_s) as endpoint:
        yield endpoint


@contextlib.contextmanager
def mlflow_server(root: Path, port: Optional[int] = None, timeout_s: float = 120) -> Iterator[str]:
    """Start an MLflow server over `root`, wait for /health, yield its URI; stop it on exit."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner workers: ~0.5 GB less
    with _serve(mlflow_server_command(root, port), port, "/health", root / "server.log", "mlflow server",
                timeout_s, env) as uri:
        yield uri
