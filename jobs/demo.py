"""The whole pipeline on this machine: local data served over HTTP, local Ray, local MLflow.

    python -m jobs.demo --config conf/demo.yaml [key=value ...]
"""

import signal
import sys

from jobs.config import run_job
from pipelines.demo import DemoConfig, run_demo


def main() -> None:
    # a SIGTERM (kill, a CI timeout) unwinds like Ctrl-C: the photo server, MLflow server and local Ray stop too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    run_job(__doc__, DemoConfig, run_demo, report=lambda result: None)  # run_demo prints its own summary


if __name__ == "__main__":
    main()
