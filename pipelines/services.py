"""Local services the demo and the tests start and stop themselves: an MLflow tracking server (SQLite backend,
artifacts on disk) bound to 127.0.0.1."""

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
        deadline = time.time() + timeout_s
        while True:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start (see {root / 'server.log'}): "
                                       f"{(root / 'server.log').read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
